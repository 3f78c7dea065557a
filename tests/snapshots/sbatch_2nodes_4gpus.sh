#!/bin/bash

# Parameters
#SBATCH --account=lab
#SBATCH --constraint=a100
#SBATCH --cpus-per-task=8
#SBATCH --dependency=afterok:1234:1235_2
#SBATCH --error=/shared/results/demo/submitit/20250101-000000-abc123/%j_0_log.err
#SBATCH --gpus-per-node=4
#SBATCH --job-name=hpckd-finetune-abc123
#SBATCH --kill-on-invalid-dep=yes
#SBATCH --mem=256GB
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --open-mode=append
#SBATCH --output=/shared/results/demo/submitit/20250101-000000-abc123/%j_0_log.out
#SBATCH --partition=gpu
#SBATCH --qos=high
#SBATCH --signal=USR2@90
#SBATCH --time=720
#SBATCH --wckey=submitit

# setup
module load cuda/12.1
source /opt/venv/bin/activate

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output /shared/results/demo/submitit/20250101-000000-abc123/%j_%t_log.out --error /shared/results/demo/submitit/20250101-000000-abc123/%j_%t_log.err --kill-on-bad-exit=1 /opt/venv/bin/python -u -m submitit.core._submit /shared/results/demo/submitit/20250101-000000-abc123
