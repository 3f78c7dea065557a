"""Against the real single-node SLURM of slurm/up.sh (CI starts it): a tiny sweep submitted with
``--executor slurm --wait`` produces the table, relaunches submit nothing new, two launches at
once submit each stage once, a failed teacher's dependents are reported as blocked by it, and a
stage preempted mid-run (SIGUSR2, submitit checkpoint + requeue) ends with exactly the metrics of
an uninterrupted run. Every wait has a timeout; jobs left behind are cancelled."""
import csv
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpc_kd.executors import sbatch_script
from hpc_kd.resources import load_profile

from .conftest import require_slurm, tiny_config, write_yaml

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "slurm" / "profiles" / "local.yaml"
TIMEOUT = 900  # seconds for any launch that waits for its jobs (4-5 chained jobs, each starting
# Python and torch; the slower machines of this kind, and a core shared by two hyper-threads, run
# them one at a time)


@pytest.fixture(scope="module")
def cluster():
    require_slurm()
    out = subprocess.run(["sinfo", "-h", "-o", "%a %t"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, f"sinfo is installed but SLURM does not answer: {out.stderr.strip()} (bash slurm/up.sh)"
    return out.stdout


@pytest.fixture
def roots(cluster):
    """Sweep output folders made by a test; their jobs are cancelled when it ends."""
    made: list[Path] = []
    yield made
    ids = [json.loads(p.read_text())["job_id"] for root in made for p in root.glob("runs/*/job.json")]
    ids = [j for j in ids if j]
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, timeout=30)


def launch(*args, timeout=TIMEOUT) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HPC_KD_NO_PROGRESS": "1"}
    return subprocess.run([sys.executable, "-m", "hpc_kd.launch", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


def slurm(sweep, *extra, timeout=TIMEOUT):
    return launch(sweep, "--executor", "slurm", "--profile", PROFILE, *extra, timeout=timeout)


def make_sweep(tiny_model, tmp_path, roots, **sections) -> tuple[Path, Path]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config(tiny_model, tmp_path / "out", **sections)
    root = tmp_path / "out" / cfg["name"]
    roots.append(root)
    return write_yaml(tmp_path / "sweep.yaml", cfg), root


def records(root: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in root.glob("runs/*/job.json")}


def table(root: Path) -> list[dict]:
    with open(root / "table.csv") as f:
        return list(csv.DictReader(f))


def submit_and_wait_for_step(sweep: Path, root: Path, step: int) -> str:
    """Submit ``sweep`` to SLURM and return its teacher's key once the teacher has logged ``step``."""
    first = slurm(sweep)
    assert first.returncode == 0, first.stderr
    teacher = json.loads((root / "sweep.json").read_text())["order"][0]
    metrics = root / "runs" / teacher / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not any(json.loads(line).get("step", 0) >= step for line in _lines(metrics)):
        assert time.monotonic() < deadline, f"the teacher did not reach step {step} in time"
        time.sleep(0.1)
    return teacher


def test_sweep_on_slurm(tiny_model, tmp_path, roots):
    """Queue a 2-cell sweep (the tutor and both students go as one array), relaunch while it is
    queued, follow it with --wait, relaunch when it is done: one job per stage, and the table."""
    sweep, root = make_sweep(tiny_model, tmp_path, roots,
                             grid={"student.layers": [[2], [1]], "distill.policy": ["teacher"]})
    first = slurm(sweep)
    assert first.returncode == 0, first.stderr
    assert "[submitted] distill x3 as an array of 3" in first.stderr  # same kind, resources and inputs
    jobs = records(root)
    assert len(jobs) == 5 and all(r["executor"] == "slurm" and r["attempt"] == 1 for r in jobs.values())
    assert sum("_" in r["job_id"] for r in jobs.values()) == 3

    again = slurm(sweep)  # while queued or running: nothing is submitted twice
    assert again.returncode == 0, again.stderr
    assert "[submitted]" not in again.stderr
    # how many are still queued or running depends on how fast the first ones ran (a race no test
    # should bet on); none is submitted again, and every stage is either done or still in flight
    found = re.search(r"0 stage jobs submitted, (\d+) already queued or running", again.stdout)
    queued = int(found.group(1)) if found else 0  # all finished before the relaunch looked: none
    done_since = sum((root / "runs" / k / "result.json").exists() for k in jobs)  # read after the launch looked
    assert 5 - done_since <= queued <= 5

    waited = slurm(sweep, "--wait")
    assert waited.returncode == 0, waited.stdout + waited.stderr
    assert "[done]" in waited.stderr and "5/5 stages done" in waited.stdout
    rows = table(root)
    assert [r["role"] for r in rows] == ["teacher", "tutor", "student", "student"]
    assert all(r["state"] == "done" and r["val_acc"] and r["val_macro_f1"] and r["params"] for r in rows)
    assert [(r["depth"], r["policy"]) for r in rows[2:]] == [("2", "teacher"), ("1", "teacher")]
    assert (root / "table.md").read_text() in waited.stdout and (root / "table.parquet").is_file()

    done = slurm(sweep)
    assert done.returncode == 0 and "[submitted]" not in done.stderr
    assert {k: (r["job_id"], r["attempt"]) for k, r in records(root).items()} == {
        k: (r["job_id"], 1) for k, r in jobs.items()}
    status = launch("status", root)
    assert status.returncode == 0 and "5 stages: 5 done" in status.stdout

    # The script submitit handed to sbatch is the one the snapshot test pins (same generator).
    teacher = next(r for r in jobs.values() if r["name"].startswith("hpckd-finetune"))
    script = (Path(teacher["folder"]) / f"{teacher['job_id']}_submission.sh").read_text()
    res = load_profile(PROFILE).for_kind("finetune")
    assert script == sbatch_script(res, teacher["folder"], teacher["name"], teacher["after"],
                                   python=shlex.quote(sys.executable))


def test_two_launches_at_once_submit_each_stage_once(tiny_model, tmp_path, roots):
    sweep, root = make_sweep(tiny_model, tmp_path, roots, grid={"distill.policy": ["teacher", "min_loss"]})
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "hpc_kd.launch", str(sweep), "--executor", "slurm", "--profile", str(PROFILE)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
             for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    jobs = records(root)
    assert len(jobs) == 5 and all(r["attempt"] == 1 for r in jobs.values())
    submitted = [int(n) for _, err in outs for n in re.findall(r"^\[submitted\] \w+ x(\d+)", err, re.M)]
    assert sum(submitted) == 5
    # while queued, status and the table say so (from the scheduler, not from the files alone)
    status = launch("status", root)
    assert status.returncode == 0 and "5 stages: " in status.stdout
    assert not re.search(r"failed|blocked|missing", status.stdout), status.stdout
    aggregate = subprocess.run([sys.executable, "-m", "hpc_kd.aggregate", str(root)], capture_output=True, text=True,
                               timeout=120, cwd=REPO)
    assert aggregate.returncode == 0, aggregate.stderr
    assert {r["state"] for r in table(root)} <= {"pending", "running", "done"}


def test_failed_teacher_blocks_dependents(tiny_model, tmp_path, roots):
    broken = tmp_path / "no-model-here"
    broken.mkdir()
    sweep, root = make_sweep(tiny_model, tmp_path, roots, teacher={"pretrained": str(broken)},
                             grid={"distill.policy": ["teacher", "min_loss"]})
    run = slurm(sweep, "--wait")
    assert run.returncode == 1, run.stdout + run.stderr
    order = json.loads((root / "sweep.json").read_text())["order"]
    teacher, dependents = order[0], order[1:]
    status = launch("status", root)
    assert status.returncode == 0
    lines = {line.split()[0]: line for line in status.stdout.splitlines() if line.startswith("  ")}
    assert " failed " in lines[teacher]
    for key in dependents:
        assert f"blocked (never ran because {teacher} failed)" in lines[key], status.stdout
    log = next(line.split("log: ")[1] for line in status.stdout.splitlines() if "log: " in line)
    assert Path(log).is_file() and "Traceback" in Path(log).read_text()
    assert [r["state"] for r in table(root)] == ["failed", "blocked", "blocked", "blocked"]
    # the dependents' jobs never started: SLURM cancelled them (kill-on-invalid-dep)
    assert not any((root / "runs" / key / "config.json").exists() for key in dependents)
    again = slurm(sweep)  # without --retry nothing is resubmitted
    assert again.returncode == 1 and "[submitted]" not in again.stderr


def test_requeue_mid_run_ends_with_the_uninterrupted_metrics(tiny_model, tmp_path, roots):
    """Preempt the teacher mid-run (SIGUSR2: submitit checkpoints and requeues it); it resumes
    from checkpoint.pt and every stage ends as in an uninterrupted run (debug executor)."""
    # plain KD (TEID runs on SLURM in test_distributed) and a 250-step teacher, to keep CI short
    sections = dict(data={"max_train_examples": 2000},
                    teacher={"train": {"lr": 1e-3, "batch_size": 16, "epochs": 2}},
                    tutor={"train": {"lr": 1e-3, "batch_size": 32, "epochs": 1}},
                    student={"train": {"lr": 1e-3, "batch_size": 32, "epochs": 1}},
                    distill={"policy": "teacher"},
                    run={"progress": False, "checkpoint_every": 20, "log_every": 10, "threads": 1})
    sweep, root = make_sweep(tiny_model, tmp_path / "slurm", roots, **sections)
    ref_sweep, ref_root = make_sweep(tiny_model, tmp_path / "ref", [], **sections)
    teacher = submit_and_wait_for_step(sweep, root, 60)
    job = records(root)[teacher]["job_id"]
    subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=30)

    reference = launch(ref_sweep, "--executor", "debug")  # meanwhile, uninterrupted, in one process
    assert reference.returncode == 0, reference.stderr
    waited = slurm(sweep, "--wait")
    assert waited.returncode == 0, waited.stdout + waited.stderr

    log = Path(records(root)[teacher]["stdout"]).read_text()
    assert "this job is preempted" in Path(records(root)[teacher]["stderr"]).read_text()
    assert f"{teacher}: resuming from" in log  # it resumed, it did not start over
    assert records(root)[teacher]["attempt"] == 1  # requeued by SLURM, not resubmitted
    for run in sorted((ref_root / "runs").glob("*-*")):
        mine = root / "runs" / run.name
        assert _result(mine) == _result(run), run.name
        assert _lines(mine / "metrics.jsonl") == _lines(run / "metrics.jsonl"), run.name


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


def _result(run: Path) -> dict:
    result = json.loads((run / "result.json").read_text())
    result.pop("train_seconds", None)
    return result


def test_cancel_scancels_the_sweep_and_a_relaunch_resumes_it(tiny_model, tmp_path, roots):
    """`launch cancel` on a sweep queued on SLURM: scancel for the running teacher and its queued
    dependents (an array among them), status shows them cancelled (not failed, not blocked), and a
    relaunch resumes the teacher from its checkpoint and finishes the sweep."""
    sections = dict(data={"max_train_examples": 2000},
                    teacher={"train": {"lr": 1e-3, "batch_size": 16, "epochs": 8}},
                    run={"progress": False, "checkpoint_every": 20, "log_every": 10, "threads": 1},
                    # plain KD: the tutor and the student go as an array (TEID runs on SLURM in test_distributed)
                    grid={"distill.policy": ["teacher"]})
    sweep, root = make_sweep(tiny_model, tmp_path, roots, **sections)
    teacher = submit_and_wait_for_step(sweep, root, 40)
    ids = {k: r["job_id"] for k, r in records(root).items()}
    out = launch("cancel", root)
    assert out.returncode == 0, out.stdout + out.stderr
    deadline = time.monotonic() + 60
    while True:  # SLURM has nothing of the sweep left queued or running
        queue = subprocess.run(["squeue", "-h", "-o", "%i", "-j", ",".join(ids.values())], capture_output=True,
                               text=True, timeout=30).stdout.split()
        if not queue:
            break
        assert time.monotonic() < deadline, f"still in the queue after cancel: {queue}"
        time.sleep(1)
    # the teacher may have finished while cancel looked (a race no test should bet on): what is
    # not done was cancelled, and is shown as cancelled, never as failed or blocked
    cancelled = [k for k, r in records(root).items() if r.get("cancelled")]
    unfinished = [k for k in ids if not (root / "runs" / k / "result.json").exists()]
    assert unfinished and set(unfinished) <= set(cancelled)
    assert f"{len(cancelled)} stage job(s) cancelled" in out.stdout
    shown = launch("status", root).stdout
    assert shown.count("cancelled") == len(unfinished) and " failed " not in shown and "blocked" not in shown, shown
    again = slurm(sweep, "--wait")
    assert again.returncode == 0, again.stdout + again.stderr
    if teacher in unfinished:
        assert f"{teacher}: resuming from" in Path(records(root)[teacher]["stdout"]).read_text()
    assert [r["state"] for r in table(root)] == ["done"] * 3  # teacher, tutor, student
