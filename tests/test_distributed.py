"""Several ranks, on CPU with gloo.

Pure: where a rank learns its place (torchrun, SLURM, submitit), the master port, the launch of a
2-node x 4-GPU job (snapshot), the ``deepspeed`` config section and its effect on signatures.
Real ranks (``torch.distributed.run --nproc_per_node 2``, one launch for several sweeps): the
fine-tuned teacher, its 2-rank logit cache, the KD tutor and the TEID student (online tutor,
min-loss) give the one-process losses and metrics within 1e-5 under ZeRO 0, 1, 2 (and ZeRO-3
with gradient accumulation); the 2-rank cache equals a one-process cache within 1e-6; a 2-rank
run stopped mid-epoch resumes to exactly the uninterrupted 2-rank run. The same on the test
SLURM cluster with ``tasks_per_node=2`` (marked ``slurm``).

The tiny model is the suite's, with dropout off: ranks draw their own dropout masks, so with
dropout on, 2 ranks equal 1 rank only in distribution (the resume test keeps dropout on).
"""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hpc_kd import distributed
from hpc_kd.config import ConfigError, DeepSpeedConfig, ExperimentConfig, TrainConfig, from_dict
from hpc_kd.distributed import World, detect, device_for, master_port, parse_nodelist, torchrun_command
from hpc_kd.plan import load_plan
from hpc_kd.policies import POLICIES

from .conftest import assert_snapshot, glue_data, plan_of, process_env, require_slurm, run_plan, tiny_config, write_yaml

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-5
LAUNCH_TIMEOUT = 900


# -- where ranks come from (pure) -------------------------------------------------------------


@pytest.mark.parametrize("text, hosts", [
    ("gpu017", ["gpu017"]),
    ("gpu[017-018]", ["gpu017", "gpu018"]),
    ("gpu[1-2,10],cpu-a", ["gpu1", "gpu2", "gpu10", "cpu-a"]),
    ("n[08-10]-ib,m1", ["n08-ib", "n09-ib", "n10-ib", "m1"]),
])
def test_nodelist(text, hosts):
    assert parse_nodelist(text) == hosts


def test_master_port_is_below_the_ephemeral_range_and_differs_between_jobs():
    ports = [master_port(job) for job in range(100000, 112000)]
    assert len(set(ports)) == 12000 and 20000 <= min(ports) and max(ports) < 32768
    assert master_port("4242_7") == master_port(42427)  # array task ids: digits only


def slurm_env(rank: int, nodes: int = 2, per_node: int = 4, job: str = "4242", nodelist: str = "gpu[017-018]") -> dict:
    return {"SLURM_JOB_ID": job, "SLURM_JOB_NODELIST": nodelist, "SLURM_JOB_NUM_NODES": str(nodes),
            "SLURM_NTASKS": str(nodes * per_node), "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank % per_node),
            "SLURM_NODEID": str(rank // per_node)}


def test_detect_each_launcher():
    assert detect({}) == World()
    assert detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_ID": "9"}).size == 1
    torchrun = detect({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                       "MASTER_ADDR": "n1", "MASTER_PORT": "29511", **slurm_env(0)})  # torchrun inside srun wins
    assert torchrun == World(3, 4, 1, 2, "n1", 29511, "torchrun")
    assert detect(slurm_env(5)) == World(5, 8, 1, 4, "gpu017", master_port(4242), "slurm")
    assert detect({**slurm_env(5), "MASTER_PORT": "30001"}).master_port == 30001
    local = detect({"SUBMITIT_LOCAL_NTASKS": "2", "SUBMITIT_LOCAL_GLOBALID": "1", "SUBMITIT_LOCAL_LOCALID": "1",
                    "SUBMITIT_LOCAL_JOB_ID": "31337"})
    assert local == World(1, 2, 1, 2, "127.0.0.1", master_port(31337), "submitit-local")


def test_devices():
    assert device_for(World(), "auto", cuda_devices=0) == "cpu"
    assert device_for(World(), "auto", cuda_devices=1) == "cuda"  # one rank: as without DeepSpeed
    assert device_for(World(5, 8, 1, 4), "auto", cuda_devices=4) == "cuda:1"
    assert device_for(World(5, 8, 1, 4), "auto", cuda_devices=1) == "cuda:0"  # one GPU bound per task
    assert device_for(World(5, 8, 1, 4), "cpu", cuda_devices=4) == "cpu"


def test_launch_of_a_2_node_4_gpu_job_snapshot():
    """What each of the 8 tasks of a 2-node x 4-GPU SLURM job exports and trains on, the DeepSpeed
    config its engines get, and the by-hand torchrun command. (The sbatch script of such a job
    is pinned by tests/test_executors.py.)"""
    from hpc_kd.engine import ds_config

    ranks = []
    for rank in range(8):
        world = detect(slurm_env(rank))
        ranks.append({"slurm": slurm_env(rank), "env": world.env(), "device": device_for(world, "auto", cuda_devices=4)})
    train = TrainConfig(lr=2e-5, batch_size=32, deepspeed=DeepSpeedConfig(zero_stage=2, precision="bf16", gradient_accumulation=2))
    text = json.dumps({
        "ranks": ranks,
        "deepspeed_config": ds_config(train, train.deepspeed, 8),
        "by_hand": torchrun_command(2, 4, "gpu017", master_port(4242), "4242", "jobs/sst2_paper.yaml"),
    }, indent=2, sort_keys=True) + "\n"
    assert_snapshot("distributed_2nodes_4gpus.json", text)


# -- the run command --------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["hpc_kd.launch", "run"], ["hpc_kd", "run"]], ids=["launch-run", "hpc-kd-run"])
def test_run_command_refuses_a_bad_config(tiny_model, tmp_path, command):
    """``python -m hpc_kd.launch run`` (and ``hpc-kd run``, here ``python -m hpc_kd run``) checks
    the sweep before anything starts: a bad value exits 2 with one line naming the key."""
    sweep = write_yaml(tmp_path / "s.yaml", tiny_config(tiny_model, tmp_path / "out"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HPC_KD_NO_PROGRESS": "1"}
    out = subprocess.run([sys.executable, "-m", *command, str(sweep), "distill.policy=nope"], capture_output=True,
                         text=True, timeout=300, env=env, cwd=REPO)
    assert out.returncode == 2, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("config error")]
    assert errors == ["config error: distill.policy: unknown policy 'nope'; allowed: " + ", ".join(POLICIES)]
    assert not (tmp_path / "out").exists()


def test_run_command_runs_the_stages_asked_for(tiny_model, tmp_path, capsys):
    """One process is a job of one rank: ``run --stage KEY`` runs that stage and nothing else."""
    from hpc_kd import launch

    sweep = write_yaml(tmp_path / "s.yaml", tiny_config(tiny_model, tmp_path / "out"))
    plan = load_plan(sweep)
    teacher = next(iter(plan.stages))
    assert launch.main(["run", str(sweep), "--stage", teacher]) == 0
    assert [k for k, s in plan.stages.items() if s.run_dir(plan.root).done()] == [teacher]
    assert f"[run] {teacher} (teacher) on 1 rank(s)" in capsys.readouterr().out
    assert not distributed.active()


# -- the deepspeed section ----------------------------------------------------------------------


@pytest.mark.parametrize("section, message", [
    ({"zero_stage": 4}, "student.train.deepspeed.zero_stage: must be 0, 1, 2 or 3, got 4"),
    ({"precision": "fp8"}, "student.train.deepspeed.precision: 'fp8' is not allowed; allowed: fp32, bf16, fp16"),
    ({"gradient_accumulation": 0}, "student.train.deepspeed.gradient_accumulation: must be >= 1, got 0"),
    ({"offload_optimizer": "cpu"}, "student.train.deepspeed.offload_optimizer: needs zero_stage 1, 2 or 3"),
    ({"offload_optimizer": "nvme", "zero_stage": 3}, "student.train.deepspeed.offload_optimizer: 'nvme' is not allowed"),
    ({"stage": 2}, "student.train.deepspeed.stage: unknown key; allowed: zero_stage, precision"),
])
def test_deepspeed_errors_name_the_key(tiny_model, tmp_path, section, message):
    cfg = tiny_config(tiny_model, tmp_path, student={"train": {"deepspeed": section}})
    with pytest.raises(ConfigError) as err:
        from_dict(ExperimentConfig, cfg)
    assert str(err.value).startswith(message)


def test_how_a_stage_runs_is_not_what_it_computes(tiny_model, tmp_path):
    def keys(**train):
        cfg = tiny_config(tiny_model, tmp_path, teacher={"train": {"lr": 1e-3, "batch_size": 16, "epochs": 2, **train}})
        return list(plan_of(cfg).stages)

    plain = keys()
    assert keys(deepspeed={"zero_stage": 3, "gradient_accumulation": 4, "offload_optimizer": "cpu"}) == plain
    bf16 = keys(deepspeed={"precision": "bf16"})
    assert bf16[0] != plain[0] and bf16[1:] != plain[1:]  # the teacher and all it feeds


def test_sst2_paper_sweep_and_its_cluster_profile_load():
    from hpc_kd.resources import load_profile

    plan = load_plan(REPO / "jobs" / "sst2_paper.yaml")
    teacher = next(s for s in plan.stages.values() if s.kind == "finetune")
    assert (teacher.pretrained, teacher.train.lr, teacher.train.batch_size, teacher.train.epochs) == ("bert-base-uncased", 2e-5, 32, 4)
    assert teacher.train.deepspeed is not None
    depths = sorted({s.depth for s in plan.stages.values() if s.kind == "distill"})
    assert depths == [9, 10, 11]
    profile = load_profile(REPO / "slurm" / "sst2_cluster.yaml")
    res = profile.for_kind("finetune")
    assert res.nodes * res.tasks_per_node > 1 and res.tasks_per_node == res.gpus_per_node


# -- real ranks -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quiet_model(tiny_model, tmp_path_factory) -> Path:
    """The tiny model with dropout off (see the module docstring)."""
    path = tmp_path_factory.mktemp("quiet") / "bert"
    shutil.copytree(tiny_model, path)
    config = json.loads((path / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (path / "config.json").write_text(json.dumps(config))
    return path


def chain_config(model: Path, root: Path, deepspeed: dict | None = None, **sections) -> dict:
    """The tiny chain (``sections`` replace or extend the config's sections), under ``deepspeed``."""
    cfg = tiny_config(model, root, run={"progress": False, "checkpoint_every": 2, "log_every": 1, "threads": 1},
                      **sections)
    if deepspeed is not None:
        for role in ("teacher", "tutor", "student"):
            cfg[role]["train"] = {**cfg[role]["train"], "deepspeed": deepspeed}
    return cfg


@pytest.fixture(scope="module")
def reference(quiet_model, tmp_path_factory):
    """The chain in this process, without DeepSpeed: the numbers every rank count must give."""
    plan = plan_of(chain_config(quiet_model, tmp_path_factory.mktemp("reference")))
    run_plan(plan)
    return plan


def pair_config(model: Path, root: Path, files: dict, deepspeed: dict | None = None) -> dict:
    """The chain on a sentence-pair task (MRPC-like local files, with a second evaluation file)."""
    return chain_config(model, root, deepspeed, data=glue_data(files, "mrpc"))


#: a language model's chain: a tiny Llama (no dropout) with a sparse top-8 teacher cache
LM_SECTIONS = {"data": {"task": "causal_lm", "name": "rotten_tomatoes", "max_train_examples": 64, "max_eval_examples": 24,
                        "max_length": 32}, "distill": {"sparse_k": 8}}


@pytest.fixture(scope="module")
def lm_reference(tiny_decoder, tmp_path_factory):
    plan = plan_of(chain_config(tiny_decoder, tmp_path_factory.mktemp("lm_reference"), **LM_SECTIONS))
    run_plan(plan)
    return plan


@pytest.fixture(scope="module")
def pair_reference(quiet_model, glue_files, tmp_path_factory):
    plan = plan_of(pair_config(quiet_model, tmp_path_factory.mktemp("pair_reference"), glue_files))
    run_plan(plan)
    return plan


# ZeRO 1 runs in the resumed pair (RESUME), against its uninterrupted twin: one chain less to keep CI short
ZERO = {"zero0": {"zero_stage": 0}, "zero2": {"zero_stage": 2},
        "zero3-accumulation2": {"zero_stage": 3, "gradient_accumulation": 2}}
RESUME = {"zero_stage": 1, "gradient_accumulation": 2}


def torchrun(jobs: list[dict], folder: Path) -> subprocess.CompletedProcess:
    spec = folder / f"jobs-{len(list(folder.glob('jobs-*')))}.json"
    spec.write_text(json.dumps(jobs))
    env = process_env(HF_HUB_OFFLINE="1", HPC_KD_NO_PROGRESS="1", OMP_NUM_THREADS="1")
    # --standalone: torchrun picks a free port itself (a port chosen here could be taken before it binds)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests" / "dist_worker.py"), str(spec)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, env=env, cwd=REPO)
    assert out.returncode == 0, (out.stdout + out.stderr)[-6000:]
    return out


@pytest.fixture(scope="module")
def launched(quiet_model, tiny_model, tiny_decoder, glue_files, tmp_path_factory):
    """One 2-rank launch: a chain per ZeRO setting, and the chain on a pair task (ZeRO 2); with
    dropout on, an uninterrupted chain and one stopped at step 7 of its student (last checkpoint at
    step 6); then a second launch resumes it."""
    folder = tmp_path_factory.mktemp("ranks")
    sweeps = {name: write_yaml(folder / f"{name}.yaml", chain_config(quiet_model, folder / name, ds))
              for name, ds in ZERO.items()}
    sweeps["pair"] = write_yaml(folder / "pair.yaml", pair_config(quiet_model, folder / "pair", glue_files, ZERO["zero2"]))
    sweeps["lm"] = write_yaml(folder / "lm.yaml", chain_config(tiny_decoder, folder / "lm", ZERO["zero2"], **LM_SECTIONS))
    for name in ("uninterrupted", "resumed"):
        sweeps[name] = write_yaml(folder / f"{name}.yaml", chain_config(tiny_model, folder / name, RESUME))
    jobs = [{"sweep": str(path), "stop_at": 7 if name == "resumed" else None} for name, path in sweeps.items()]
    first = torchrun(jobs, folder)
    assert first.stdout.count("stopped") == 2, first.stdout[-3000:]  # both ranks
    plans = {name: load_plan(path) for name, path in sweeps.items()}
    student = plans["resumed"].stages[list(plans["resumed"].stages)[-1]].run_dir(plans["resumed"].root)
    assert student.checkpoint.exists() and not student.done()
    torchrun([{"sweep": str(sweeps["resumed"]), "stop_at": None}], folder)
    return plans


def losses(metrics):
    return [m["loss"] for m in metrics if m["type"] == "train"]


def epochs(metrics):
    return [{k: v for k, v in m.items() if k != "step"} for m in metrics if m["type"] == "epoch"]


def logits(model_dir: Path, tokenizer_dir: Path) -> torch.Tensor:
    from hpc_kd.models import load_classifier, load_tokenizer

    tok = load_tokenizer(str(tokenizer_dir))
    batch = tok(["a gripping , funny film", "dull and far too long", "it is what it is"], return_tensors="pt", padding=True)
    with torch.no_grad():
        return load_classifier(model_dir)(**batch).logits


def close(a, b, tol: float = TOL) -> bool:
    """Equal structures; numbers within ``tol``, absolute and relative (a language model's summed
    NLL of a sequence, ~160, or a perplexity, ~1,700, round at a larger absolute scale)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(close(a[k], b[k], tol) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(close(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and not isinstance(a, bool):
        return isinstance(b, (int, float)) and abs(a - b) <= tol * max(1.0, abs(b))
    return a == b


def comparable(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in ("train_seconds", "execution")}


@pytest.mark.slow
@pytest.mark.parametrize("setting", list(ZERO))
def test_two_ranks_give_the_one_process_numbers(reference, launched, setting):
    assert_same_numbers(reference, launched[setting], ZERO[setting])


@pytest.mark.slow
def test_two_ranks_give_the_one_process_numbers_on_a_pair_task(pair_reference, launched):
    assert_same_numbers(pair_reference, launched["pair"], ZERO["zero2"])
    student = list(pair_reference.stages)[-1]
    result = pair_reference.stages[student].run_dir(pair_reference.root).result()
    assert result["validation"]["metric"] == "f1_accuracy" and result["pair_mismatched"]["n"] == 32


@pytest.mark.slow
def test_two_ranks_give_the_one_process_numbers_on_a_language_model(lm_reference, launched):
    """A decoder chain with a sparse teacher cache written by both ranks: the one-process numbers."""
    assert_same_numbers(lm_reference, launched["lm"], ZERO["zero2"])
    student = list(lm_reference.stages)[-1]
    result = lm_reference.stages[student].run_dir(lm_reference.root).result()
    assert result["validation"]["metric"] == "token_nll" and result["targets"] == "cache"


def assert_same_numbers(reference, plan, deepspeed: dict) -> None:
    """Every stage of ``plan`` (run on 2 ranks) has ``reference``'s (one process) numbers."""
    assert list(plan.stages) == list(reference.stages)  # DeepSpeed does not change what a stage is
    for key, stage in reference.stages.items():
        ref, got = stage.run_dir(reference.root), plan.stages[key].run_dir(plan.root)
        assert got.done() and not got.checkpoint.exists() and not (got.path / "deepspeed").exists()
        if stage.kind == "cache":
            continue
        ref_m, got_m = ref.metrics(), got.metrics()
        assert len(got_m) == len(ref_m)  # rank 0 wrote every record once
        assert np.allclose(losses(got_m), losses(ref_m), atol=TOL, rtol=0), key
        assert close(epochs(got_m), epochs(ref_m)), key  # validation metrics, selection counts
        r, g = ref.result(), got.result()
        assert g["execution"] == {"ranks": 2, "deepspeed": {**DeepSpeedConfig().__dict__, **deepspeed}}
        assert close(comparable(g), comparable(r)), key  # validation and test metrics, selection
        for part in ("model", "tutor"):
            if (ref.path / part).exists():
                assert torch.allclose(logits(got.path / part, got.path / part), logits(ref.path / part, ref.path / part),
                                      atol=TOL, rtol=0), (key, part)


@pytest.mark.slow
def test_two_rank_cache_equals_a_one_process_cache(launched, tmp_path):
    from hpc_kd.cache import LogitCache, write_cache
    from hpc_kd.data import Dataset
    from hpc_kd.models import load_classifier, load_tokenizer

    plan = launched["zero2"]
    cache = next(s for s in plan.stages.values() if s.kind == "cache")
    two = json.loads((cache.folder(plan.root) / "manifest.json").read_text())
    assert two["world_size"] == 2 and {s["rank"] for s in two["shards"]} == {0, 1}
    model_dir = cache.model.path(plan.root)  # the teacher the two ranks trained
    dataset = Dataset.build(cache.data, load_tokenizer(str(model_dir)))
    expected = cache.expected(plan.root, dataset)
    write_cache(tmp_path / "one", load_classifier(model_dir), dataset.encoded["train"], expected, cache.data.num_labels)
    ids = dataset.encoded["train"].ids
    one = LogitCache.open(tmp_path / "one", expected, ids)
    both = LogitCache.open(cache.folder(plan.root), expected, ids)
    assert np.array_equal(one.ids, both.ids) and two["total_rows"] == len(ids)
    assert torch.allclose(one.logits_table, both.logits_table, atol=1e-6, rtol=1e-5)  # other batches: rounding


@pytest.mark.slow
def test_a_resumed_two_rank_run_equals_the_uninterrupted_one(launched):
    plan, ref_plan = launched["resumed"], launched["uninterrupted"]
    for key, stage in ref_plan.stages.items():
        ref, got = stage.run_dir(ref_plan.root), plan.stages[key].run_dir(plan.root)
        assert comparable(got.result()) == comparable(ref.result()), key
        assert got.metrics() == ref.metrics(), key
        for part in ("model", "tutor"):
            if (ref.path / part).exists():
                assert (got.path / part / "model.safetensors").read_bytes() == (ref.path / part / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_one_rank_under_deepspeed_is_the_plain_loop(quiet_model, reference, tmp_path):
    """A ``deepspeed`` section on one process (a private process group, no port): the teacher's
    numbers are the plain loop's."""
    plan = plan_of(chain_config(quiet_model, tmp_path, {"zero_stage": 2}))
    key, teacher = next(iter(plan.stages.items()))
    result = teacher(plan.root, plan.run)
    ref = reference.stages[key].run_dir(reference.root)
    assert np.allclose(losses(teacher.run_dir(plan.root).metrics()), losses(ref.metrics()), atol=TOL, rtol=0)
    assert close(result["validation"], ref.result()["validation"])
    assert result["execution"]["ranks"] == 1 and distributed.current().size == 1


# -- a SLURM job with two tasks ---------------------------------------------------------------


@pytest.mark.slurm
@pytest.mark.slow
def test_two_tasks_of_a_slurm_job_give_the_one_process_numbers(reference, quiet_model, tmp_path):
    """submitit, ``ntasks_per_node=2`` on the test cluster (slurm/up.sh): each task finds its rank
    in SLURM's variables, the master in the node list, the port from the job id."""
    require_slurm()
    import submitit

    from hpc_kd.launch import run_sweep

    sweep = write_yaml(tmp_path / "sweep.yaml", chain_config(quiet_model, tmp_path / "out", {"zero_stage": 2}))
    executor = submitit.SlurmExecutor(folder=tmp_path / "submitit")
    executor.update_parameters(partition="debug", nodes=1, ntasks_per_node=2, cpus_per_task=1, time=30,
                               job_name="hpckd-test-distributed")
    job = executor.submit(run_sweep, str(sweep))
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    try:
        while not job.done():
            assert time.monotonic() < deadline, f"job {job.job_id} still not done after {LAUNCH_TIMEOUT}s"
            time.sleep(2)
        assert len(job.results()) == 2  # raises with the task's traceback if one failed
    finally:
        if not job.done():
            job.cancel(check=False)
    plan = load_plan(sweep)
    assert list(plan.stages) == list(reference.stages)
    for key, stage in reference.stages.items():
        if stage.kind == "cache":
            continue
        got, ref = plan.stages[key].run_dir(plan.root), stage.run_dir(reference.root)
        assert got.result()["execution"]["ranks"] == 2
        assert np.allclose(losses(got.metrics()), losses(ref.metrics()), atol=TOL, rtol=0), key
        assert close(got.result()["validation"], ref.result()["validation"]), key


@pytest.mark.slurm
@pytest.mark.slow
def test_a_sweep_launched_on_slurm_with_two_tasks_per_stage(reference, quiet_model, tmp_path):
    """The production path: ``launch --executor slurm`` with a profile of 2 tasks per job; each
    stage job's tasks call the stage, which joins them into one process group."""
    require_slurm()
    sweep = write_yaml(tmp_path / "sweep.yaml", chain_config(quiet_model, tmp_path / "out", {"zero_stage": 1}))
    profile = write_yaml(tmp_path / "two_tasks.yaml", {"default": {"partition": "debug", "nodes": 1, "tasks_per_node": 2,
                                                                   "cpus_per_task": 1, "time_min": 30}})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HPC_KD_NO_PROGRESS": "1"}
    plan = load_plan(sweep)
    try:
        out = subprocess.run([sys.executable, "-m", "hpc_kd.launch", str(sweep), "--executor", "slurm", "--profile",
                              str(profile), "--wait"], capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, env=env, cwd=REPO)
    finally:
        ids = [json.loads(p.read_text()).get("job_id") for p in plan.root.glob("runs/*/job.json")]
        subprocess.run(["scancel", *filter(None, ids)], capture_output=True, timeout=30)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    for key, stage in reference.stages.items():
        got, ref = plan.stages[key].run_dir(plan.root), stage.run_dir(reference.root)
        assert got.done(), (key, (out.stdout + out.stderr)[-3000:])
        if stage.kind == "cache":
            assert json.loads((got.path / "logits" / "manifest.json").read_text())["world_size"] == 2
            continue
        assert got.result()["execution"]["ranks"] == 2
        assert len(got.metrics()) == len(ref.metrics())  # written once, by rank 0
        assert np.allclose(losses(got.metrics()), losses(ref.metrics()), atol=TOL, rtol=0), key
        assert close(got.result()["validation"], ref.result()["validation"]), key


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_one_rank_trains_the_chain_close_to_fp32(quiet_model, reference, tmp_path, precision):
    """``precision: bf16`` / ``fp16`` (DeepSpeed's engines for them): where DeepSpeed's
    accelerator supports the precision (its CPU accelerator: fp16 needs AVX-512), the whole chain runs, its losses track the fp32 ones to half precision, and
    the exported models are fp32 Hugging Face checkpoints that load like any other."""
    from deepspeed.accelerator import get_accelerator

    from hpc_kd.config import ConfigError, DeepSpeedConfig
    from hpc_kd.engine import _check_precision
    from hpc_kd.models import load_classifier

    acc = get_accelerator()
    if not {"bf16": acc.is_bf16_supported, "fp16": acc.is_fp16_supported}[precision]():
        # this CPU has no such kernels (e.g. fp16 on AMD EPYC without AVX-512): the stage is refused
        with pytest.raises(ConfigError, match=f"deepspeed.precision: {precision} is not supported on this machine's"):
            _check_precision(DeepSpeedConfig(precision=precision))
        return
    plan = plan_of(chain_config(quiet_model, tmp_path, {"zero_stage": 2, "precision": precision}))
    run_plan(plan)
    ref_by_kind = {}
    for key, stage in reference.stages.items():
        ref_by_kind.setdefault(type(stage).__name__, []).append(stage.run_dir(reference.root))
    for key, stage in plan.stages.items():
        run = stage.run_dir(plan.root)
        if type(stage).__name__ != "CacheLogits":
            assert run.result()["execution"]["deepspeed"]["precision"] == precision
        if type(stage).__name__ == "FineTune":
            got, ref = losses(run.metrics()), losses(ref_by_kind["FineTune"][0].metrics())
            assert np.all(np.isfinite(got)) and len(got) == len(ref)
            assert np.allclose(got, ref, atol=0.05, rtol=0) and not np.allclose(got, ref, atol=1e-6, rtol=0)
        if run.model.exists():
            model = load_classifier(run.model)
            assert {p.dtype for p in model.parameters()} == {torch.float32}
