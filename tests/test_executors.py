"""Executors without SLURM: cluster profiles (validation, the one translation to submitit, the
sbatch script a 2-node x 4-GPU stage gets), the local executor running a sweep two stages at a
time, failures and the stages they block, scheduler states, and the launch lock."""
import json
import re
import threading
import time
from pathlib import Path

import pytest

from hpc_kd import executors, launch, status
from hpc_kd.config import ConfigError
from hpc_kd.executors import sbatch_script
from hpc_kd.resources import Resources, load_profile, submitit_parameters

from .conftest import assert_snapshot, tiny_config, write_yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = Resources(partition="gpu", account="lab", qos="high", nodes=2, tasks_per_node=4, gpus_per_node=4,
                    cpus_per_task=8, mem_gb=256, time_min=720, constraint="a100",
                    setup=("module load cuda/12.1", "source /opt/venv/bin/activate"))


# -- profiles ---------------------------------------------------------------------------------


@pytest.mark.parametrize("profile, message", [
    ({"default": {"gpus": 2}}, "default.gpus: unknown key; allowed: partition, account, qos, nodes"),
    ({"default": {"nodes": 0}}, "default.nodes: must be >= 1, got 0"),
    ({"default": {"time_min": "long"}}, "default.time_min: expected an integer, got 'long'"),
    ({"default": {"setup": "module load x"}}, None),  # a single line is accepted as a list of one
    ({"kinds": {"distil": {"time_min": 5}}}, "kinds.distil: unknown stage kind; allowed: "),
    ({"kinds": {"finetune": {"cpus_per_task": -1}}}, "kinds.finetune.cpus_per_task: must be >= 1, got -1"),
    ({"kinds": {"finetune": 3}}, "kinds.finetune: expected a mapping"),
    ({"resources": {}}, "resources: unknown key; allowed: default, kinds"),
])
def test_profile_errors_name_the_key(tmp_path, profile, message):
    path = write_yaml(tmp_path / "p.yaml", profile)
    if message is None:
        assert load_profile(path).default.setup == ("module load x",)
        return
    with pytest.raises(ConfigError) as err:
        load_profile(path)
    assert message in str(err.value)


def test_profile_overrides_per_kind_on_top_of_the_default(tmp_path):
    path = write_yaml(tmp_path / "p.yaml", {"default": {"partition": "gpu", "gpus_per_node": 1, "time_min": 90},
                                            "kinds": {"finetune": {"time_min": 600}, "cache": {"gpus_per_node": 2}}})
    profile = load_profile(path)
    assert profile.for_kind("finetune") == Resources(partition="gpu", gpus_per_node=1, time_min=600)
    assert profile.for_kind("cache") == Resources(partition="gpu", gpus_per_node=2, time_min=90)
    assert profile.for_kind("distill") == profile.default == Resources(partition="gpu", gpus_per_node=1, time_min=90)


@pytest.mark.parametrize("path", sorted((REPO / "slurm" / "profiles").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_profiles_load(path):
    profile = load_profile(path)
    assert profile.default.time_min >= 20  # shorter limits turn preemptions into time-outs
    for res in [profile.default, *profile.kinds.values()]:
        assert submitit_parameters(res, "slurm")["time"] == res.time_min


def test_translation_to_submitit_parameters():
    assert submitit_parameters(CLUSTER, "slurm") == {
        "partition": "gpu", "account": "lab", "qos": "high", "nodes": 2, "ntasks_per_node": 4, "gpus_per_node": 4,
        "cpus_per_task": 8, "mem": "256GB", "time": 720, "constraint": "a100",
        "setup": ["module load cuda/12.1", "source /opt/venv/bin/activate"],
        "srun_args": ["--kill-on-bad-exit=1"]}  # several tasks: one dead rank ends the job
    # unset fields leave the cluster's defaults alone; fractional memory goes to MB
    assert submitit_parameters(Resources(mem_gb=1.5), "slurm") == {
        "nodes": 1, "ntasks_per_node": 1, "cpus_per_task": 1, "mem": "1536MB", "time": 60}
    assert submitit_parameters(CLUSTER, "local") == {  # no time limit without a scheduler to requeue
        "timeout_min": 7 * 24 * 60, "gpus_per_node": 4, "tasks_per_node": 4,
        "setup": ["module load cuda/12.1", "source /opt/venv/bin/activate"]}


def test_parameters_are_valid_for_submitit():
    """submitit rejects misspelt parameters; every translated set must pass its check."""
    from submitit.slurm.slurm import _get_default_parameters

    params = executors.slurm_parameters(CLUSTER, "hpckd-finetune-x", ["12", "13_1"])
    assert set(params) <= set(_get_default_parameters())


def test_sbatch_script_snapshot():
    """The sbatch script of a 2-node x 4-GPU stage that waits for two jobs. To accept a
    deliberate change: HPC_KD_UPDATE_SNAPSHOTS=1 python -m pytest tests/test_executors.py."""
    text = sbatch_script(CLUSTER, "/shared/results/demo/submitit/20250101-000000-abc123", "hpckd-finetune-abc123",
                         ["1234", "1235_2"], python="/opt/venv/bin/python")
    assert_snapshot("sbatch_2nodes_4gpus.sh", text)


def test_bad_profile_exits_2_and_submits_nothing(tiny_model, tmp_path, capsys):
    sweep = write_yaml(tmp_path / "s.yaml", tiny_config(tiny_model, tmp_path / "out"))
    profile = write_yaml(tmp_path / "p.yaml", {"default": {"gpu_per_node": 1}})
    code = launch.main([str(sweep), "--executor", "slurm", "--profile", str(profile)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines() == [f"profile error: {profile}: default.gpu_per_node: unknown key; allowed: "
                                        "partition, account, qos, nodes, tasks_per_node, gpus_per_node, cpus_per_task, "
                                        "mem_gb, time_min, constraint, setup"]
    assert not (tmp_path / "out").exists()


# -- running ----------------------------------------------------------------------------------


def sweep_file(tiny_model, tmp_path, **sections):
    cfg = tiny_config(tiny_model, tmp_path / "out", **sections)
    return write_yaml(tmp_path / "sweep.yaml", cfg), tmp_path / "out" / cfg["name"]


def read_table(root: Path) -> list[dict]:
    import csv

    with open(root / "table.csv") as f:
        return list(csv.DictReader(f))


def test_local_executor_runs_a_sweep_two_jobs_at_a_time(tiny_model, tmp_path, capsys):
    sweep, root = sweep_file(tiny_model, tmp_path, grid={"distill.policy": ["teacher", "min_loss"]})
    assert launch.main([str(sweep), "--executor", "local", "--jobs", "2"]) == 0
    out = capsys.readouterr()
    rows = read_table(root)
    assert [r["role"] for r in rows] == ["teacher", "tutor", "student", "student"]
    assert {r["policy"] for r in rows if r["role"] == "student"} == {"teacher", "min_loss"}
    assert all(r["state"] == "done" and r["val_acc"] for r in rows)
    assert (root / "table.md").read_text() in out.out and (root / "table.parquet").is_file()
    records = [json.loads(p.read_text()) for p in (root / "runs").glob("*/job.json")]
    assert len(records) == 5 and {r["executor"] for r in records} == {"local"}
    assert all(Path(r["stdout"]).is_file() and r["attempt"] == 1 for r in records)
    # a relaunch finds everything done and runs nothing
    assert launch.main([str(sweep), "--executor", "local", "--jobs", "2"]) == 0
    assert "[run]" not in capsys.readouterr().err
    assert all(json.loads(p.read_text())["attempt"] == 1 for p in (root / "runs").glob("*/job.json"))


def test_failed_teacher_blocks_its_dependents(tiny_model, tmp_path, capsys):
    broken = tmp_path / "broken-model"
    broken.mkdir()  # a folder, so the config is valid, but no model in it: the teacher job fails
    sweep, root = sweep_file(tiny_model, tmp_path, teacher={"pretrained": str(broken)},
                             grid={"distill.policy": ["teacher", "min_loss"]})
    assert launch.main([str(sweep), "--executor", "debug"]) == 1
    capsys.readouterr()
    assert status.main([str(root)]) == 0
    report = capsys.readouterr().out
    sweep_json = json.loads((root / "sweep.json").read_text())
    teacher = sweep_json["order"][0]
    assert sweep_json["stages"][teacher]["kind"] == "finetune"
    lines = {line.split()[0]: line for line in report.splitlines() if line.startswith("  ")}
    assert " failed " in lines[teacher]
    for key in sweep_json["order"][1:]:
        assert f"blocked (never ran because {teacher} failed)" in lines[key]
    assert f"{teacher} failed: " in report and f"folder: {root / 'runs' / teacher}" in report
    assert [r["state"] for r in read_table(root)] == ["failed", "blocked", "blocked", "blocked"]
    # without --retry a relaunch runs nothing; with it, the teacher (and only what it blocks) runs again
    assert launch.main([str(sweep), "--executor", "debug"]) == 1
    assert "[run]" not in capsys.readouterr().err
    assert launch.main([str(sweep), "--executor", "debug", "--retry"]) == 1
    assert json.loads((root / "runs" / teacher / "job.json").read_text())["attempt"] == 2


def test_status_of_a_folder_without_a_sweep(tmp_path, capsys):
    assert launch.main(["status", str(tmp_path)]) == 2
    assert "holds no sweep.json" in capsys.readouterr().err


# -- scheduler states -------------------------------------------------------------------------


def record(jid="7", **fields):
    return {"executor": "slurm", "job_id": jid, "name": "hpckd-distill-abc", "submitted_at": time.time(),
            "stderr": "/logs/7_0_log.err", **fields}


@pytest.mark.parametrize("info, expected", [
    ({"State": "PENDING", "Reason": "Dependency"}, "pending"),
    ({"State": "REQUEUED", "Reason": "BeginTime"}, "pending"),
    ({"State": "RUNNING", "Reason": "None"}, "running"),
    ({"State": "FAILED", "ExitCode": "1:0"}, "failed"),
    ({"State": "TIMEOUT"}, "failed"),
    ({"State": "PENDING", "Reason": "DependencyNeverSatisfied"}, "missing"),
    ({"State": "CANCELLED", "Reason": "Dependency"}, "missing"),
    ({"State": "RUNNING", "JobName": "someone-else"}, "missing"),  # a job id reused after a state wipe
])
def test_scheduler_states(info, expected):
    state, _, _ = status._job_state(record(), {"7": {"JobName": "hpckd-distill-abc", **info}})
    assert state == expected


def test_jobs_the_scheduler_forgot():
    assert status._job_state(record(), {})[0] == "pending"  # just submitted: sacct may lag
    assert status._job_state(record(submitted_at=time.time() - 3600), {})[0] == "missing"
    assert status._job_state(record(), None)[0] == "pending"  # SLURM cannot be asked: assume queued
    assert status._job_state(None, {})[0] == "missing"


# -- the launch lock --------------------------------------------------------------------------


def test_lock_prevents_duplicate_submission(tiny_model, tmp_path, monkeypatch, capsys):
    """Two launches of one sweep at once (threads; flock treats them as two holders): the second
    waits for the first to finish submitting, then finds every stage queued."""
    sweep, root = sweep_file(tiny_model, tmp_path, grid={"distill.policy": ["teacher", "min_loss"]})
    queue, lock = {}, threading.Lock()

    def fake_submit(folder, jobs, res, name, after):
        time.sleep(0.5)  # sbatch takes a while: widen the window for a race
        out = []
        for job in jobs:
            with lock:
                jid = str(100 + len(queue))
                queue[jid] = {"State": "PENDING", "JobName": name, "Reason": "None", "key": job.stage.key}
            out.append(executors.Submitted(jid, f"{folder}/{jid}.out", f"{folder}/{jid}.err"))
        return out

    monkeypatch.setattr(executors, "slurm_submit", fake_submit)
    monkeypatch.setattr(status, "slurm_jobs", lambda ids: {j: queue[j] for j in ids if j in queue})
    codes = []
    threads = [threading.Thread(target=lambda: codes.append(launch.main([str(sweep), "--executor", "slurm"])))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert codes == [0, 0]
    keys = [q["key"] for q in queue.values()]
    assert len(keys) == len(set(keys)) == 5
    # whether the second launch found the lock held, and what its holder had written by then, is
    # a race; what the lock guarantees is asserted above (each stage submitted once) and below
    for line in capsys.readouterr().err.splitlines():
        if line.startswith("[lock]"):
            assert re.fullmatch(r"\[lock\] waiting for .+ to finish submitting \(.+\)", line), line
    records = [json.loads(p.read_text()) for p in (root / "runs").glob("*/job.json")]
    assert sorted(r["job_id"] for r in records) == sorted(queue)


def test_local_jobs_are_running_while_their_process_lives():
    import socket
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "submitit"])
    try:
        local = {"executor": "local", "job_id": str(proc.pid), "host": socket.gethostname()}
        deadline = time.monotonic() + 10  # /proc/<pid>/cmdline is empty for a moment after the exec
        while not Path(f"/proc/{proc.pid}/cmdline").read_bytes() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert status._job_state(local, {})[0] == "running"
        assert status._job_state({**local, "host": "elsewhere"}, {})[0] == "missing"
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert status._job_state(local, {})[0] == "missing"  # it ended without a result: a relaunch runs it


def test_stage_job_refuses_a_stage_whose_signature_changed(tmp_path):
    """A job runs with the code installed when it starts: if that code gives the stage another
    signature, the job must fail loudly instead of writing into a folder nobody waits for."""
    import dataclasses

    from hpc_kd.executors import StageJob
    from hpc_kd.stages import FineTune
    from hpc_kd.config import DataConfig, RunConfig, TrainConfig

    stage = FineTune(DataConfig(), "embedded", None, "first", 0, TrainConfig())
    job = StageJob(stage, tmp_path, RunConfig(progress=False))
    job.stage = dataclasses.replace(stage, seed=1)  # what a changed signature looks like
    with pytest.raises(RuntimeError, match="code changed between submission and run"):
        job()
    assert not (tmp_path / "runs").exists()
