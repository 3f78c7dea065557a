"""The fault model: one live owner per run folder, a local worker that dies with its controller,
a serialised cache rebuild, read-only folders refused before anything starts, thread counts kept
across a resume, and launches that start nothing leave nothing behind."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from hpc_kd import launch, status
from hpc_kd.config import RunConfig
from hpc_kd.rundir import RunBusy

from .conftest import Killed, make_plan, run_plan, strip_times, tiny_config, write_yaml

REPO = Path(__file__).resolve().parents[1]


def test_a_run_folder_has_one_live_owner(tiny_model, tmp_path):
    plan = make_plan(tiny_model, tmp_path)
    teacher = next(iter(plan.stages.values()))
    run = teacher.run_dir(plan.root)
    with run.owned():  # another process (here: another open file of this one) trains it
        assert run.owner().startswith(f"pid {os.getpid()} on ")
        with pytest.raises(RunBusy, match=f"{re.escape(str(run.path))} is owned by pid {os.getpid()} on .*still running it"):
            teacher(plan.root, plan.run)
        assert sorted(p.name for p in run.path.iterdir()) == [".owner"]  # nothing was written
        states = status.stage_states(plan.root, {teacher.key: {"needs": [], "run": f"runs/{teacher.key}"}}, live=None)
        assert states[teacher.key].state is status.State.RUNNING and "owned by pid" in states[teacher.key].detail
    assert run.owner() is None
    teacher(plan.root, plan.run)
    assert run.done()


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_a_local_worker_dies_with_its_controller_and_the_relaunch_trains_alone(tiny_model, tmp_path):
    """SIGKILL the local job's controller (the pid its record names): the worker goes with it
    instead of training on unseen, and a relaunch resumes the one run to the metrics of an
    uninterrupted one."""
    import submitit

    from hpc_kd.executors import StageJob

    # a teacher of 600 steps that does not stop early: it is killed at its 10th, seconds before it
    # could finish on any machine
    sections = dict(data={"max_train_examples": 400},
                    teacher={"train": {"lr": 1e-3, "batch_size": 8, "epochs": 12, "patience": 12}},
                    run={"progress": False, "checkpoint_every": 5, "log_every": 5, "threads": 1})
    plan = make_plan(tiny_model, tmp_path / "killed", **sections)
    teacher = next(iter(plan.stages.values()))
    run = teacher.run_dir(plan.root)
    executor = submitit.LocalExecutor(folder=tmp_path / "logs")
    executor.update_parameters(timeout_min=10)
    job = executor.submit(StageJob(teacher, plan.root, plan.run))
    deadline = time.monotonic() + 120
    while not any(json.loads(line).get("step", 0) >= 10 for line in
                  (run.metrics_file.read_text().splitlines() if run.metrics_file.exists() else [])):
        assert time.monotonic() < deadline and job.state not in ("FINISHED", "FAILED"), job.stderr()
        time.sleep(0.1)
    controller = int(job.job_id)
    workers = _children(controller)
    assert workers and all(_alive(w) for w in workers)
    os.kill(controller, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while any(_alive(w) for w in workers):
        assert time.monotonic() < deadline, "the worker outlived its controller"
        time.sleep(0.1)
    assert run.owner() is None and not run.done()
    resumed = teacher(plan.root, plan.run)  # the relaunch: resumes from the checkpoint, alone
    reference_plan = make_plan(tiny_model, tmp_path / "reference", **sections)
    reference = run_plan(reference_plan)[teacher.key]
    assert strip_times(resumed) == strip_times(reference)
    assert run.metrics() == teacher.run_dir(reference_plan.root).metrics()


def test_two_readers_of_one_damaged_cache_rebuild_it_once(tiny_model, tmp_path, monkeypatch, capsys):
    from hpc_kd.data import Dataset
    from hpc_kd.models import load_tokenizer
    from hpc_kd.stages import CacheLogits

    plan = make_plan(tiny_model, tmp_path, distill={"policy": "teacher"})
    teacher, cache = list(plan.stages.values())[:2]
    run_plan(plan, only=[teacher.key, cache.key])
    manifest = cache.folder(plan.root) / "manifest.json"
    good = json.loads(manifest.read_text())
    manifest.write_text(manifest.read_text()[:40])  # cut in half: unreadable
    dataset = Dataset.build(cache.data, load_tokenizer(str(teacher.run_dir(plan.root).model)))
    builds, original = [], CacheLogits._run

    def slow_build(self, *args):
        builds.append(threading.get_ident())
        time.sleep(1.0)  # a second reader arrives while the first one rebuilds
        return original(self, *args)

    monkeypatch.setattr(CacheLogits, "_run", slow_build)
    results, errors = [], []

    def read():
        try:
            results.append(cache.load(plan.root, dataset, plan.run))
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=read) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(results) == 2
    assert len(builds) == 1  # the second reader waited, then found the rebuilt cache valid
    rebuilt = json.loads(manifest.read_text())
    assert [s["sha256"] for s in rebuilt["shards"]] == [s["sha256"] for s in good["shards"]]
    assert capsys.readouterr().err.count("rebuilding") == 1


def _read_only(folder: Path, cmd: list[str]) -> list[str]:
    """``cmd`` run with ``folder`` read-only: by permissions for a user, by a private read-only
    bind mount for root (who ignores permissions)."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return cmd
    if shutil.which("unshare") is None:
        pytest.fail("root and no unshare: cannot make a folder read-only for this test")
    script = f"mount --bind {folder} {folder} && mount -o remount,bind,ro {folder} && exec \"$@\""
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *cmd]


@pytest.mark.parametrize("which", ["sweep", "runs", "one run"])
def test_a_read_only_results_folder_is_refused_before_anything_starts(tiny_model, tmp_path, which):
    cfg = tiny_config(tiny_model, tmp_path / "out")
    sweep = write_yaml(tmp_path / "s.yaml", cfg)
    root = tmp_path / "out" / cfg["name"]
    (root / "runs").mkdir(parents=True)
    folder = {"sweep": root, "runs": root / "runs"}.get(which)
    if which == "one run":  # a stage's folder left read-only (by a copy, a mount, another user)
        folder = root / "runs" / next(iter(launch.load_plan(str(sweep), []).stages))
        folder.mkdir()
    cmd = _read_only(folder, [sys.executable, "-m", "hpc_kd.launch", str(sweep), "--executor", "local"])
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    folder.chmod(0o755)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last == f"error: {folder} is not writable (Read-only file system): nothing was started" \
        or last == f"error: {folder} is not writable (Permission denied): nothing was started", proc.stderr
    assert "Traceback" not in proc.stderr
    assert [p.name for p in (root / "runs").iterdir()] == ([folder.name] if which == "one run" else [])
    if which == "one run":
        assert list(folder.iterdir()) == []  # nothing was written in it
    else:
        assert not (root / "sweep.json").exists()


def test_a_resumed_run_keeps_its_thread_count(tiny_model, tmp_path):
    """Results differ in the last bits between thread counts: a run started with 1 thread and
    resumed where 2 are set finishes with 1, as the uninterrupted run, and says so."""
    before = torch.get_num_threads()
    try:
        reference_plan = make_plan(tiny_model, tmp_path / "ref", run={"progress": False, "checkpoint_every": 2, "threads": 1})
        reference = run_plan(reference_plan)
        plan = make_plan(tiny_model, tmp_path / "resumed", run={"progress": False, "checkpoint_every": 2, "threads": 1})
        key = list(plan.stages)[-1]
        run_plan(plan, only=list(plan.stages)[:-1])

        def kill(trainer, record):
            if trainer.p.step == 5:
                raise Killed

        with pytest.raises(Killed):
            plan.stages[key](plan.root, plan.run, on_step=kill)
        resumed = plan.stages[key](plan.root, RunConfig(progress=False, checkpoint_every=2, threads=2))
        assert resumed["threads"] == reference[key]["threads"] == 1
        assert strip_times(resumed) == strip_times(reference[key])
    finally:
        torch.set_num_threads(before)


def test_options_and_overrides_mix_and_a_launch_that_starts_nothing_leaves_no_folder(tiny_model, tmp_path, capsys):
    cfg = tiny_config(tiny_model, tmp_path / "out", distill={"policy": "teacher"})
    sweep = write_yaml(tmp_path / "s.yaml", cfg)
    root = tmp_path / "out" / cfg["name"]
    assert launch.main([str(sweep), "--jobs", "1", "run.threads=1", "--executor", "local", "seed=0"]) == 0
    assert len(list((root / "submitit").iterdir())) == 1
    assert launch.main([str(sweep), "--executor", "local", "run.threads=1"]) == 0  # all done: starts nothing
    assert len(list((root / "submitit").iterdir())) == 1
    capsys.readouterr()


def _ignore_sigint():
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize("sigint", ["default", "ignored"])
def test_cancel_stops_a_local_sweep_and_a_relaunch_resumes_it(tiny_model, tmp_path, sigint):
    """`launch cancel` on a sweep a local launcher is running: the launcher stops (exit 130), the
    running job dies (controller and worker), status says cancelled (not failed), nothing is left
    running, and the next launch resumes the cancelled stage from its checkpoint to the
    uninterrupted numbers. Also for a launcher started with SIGINT ignored, as a background job of
    a script is (and its jobs with it)."""
    sections = dict(data={"max_train_examples": 400}, teacher={"train": {"lr": 1e-3, "batch_size": 8, "epochs": 12}},
                    run={"progress": False, "checkpoint_every": 5, "log_every": 5, "threads": 1},
                    # the variant that resumes runs plain KD only (no tutor, one student), to keep CI short
                    grid={"distill.policy": ["teacher", "min_loss"] if sigint == "default" else ["teacher"]})
    cfg = tiny_config(tiny_model, tmp_path / "out", **sections)
    sweep = write_yaml(tmp_path / "s.yaml", cfg)
    root = tmp_path / "out" / cfg["name"]
    env = {**os.environ, "HPC_KD_NO_PROGRESS": "1"}
    launcher = subprocess.Popen([sys.executable, "-m", "hpc_kd.launch", str(sweep), "--executor", "local"],
                                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=_ignore_sigint if sigint == "ignored" else None)
    try:
        deadline = time.monotonic() + 120
        teacher = None
        while True:
            assert time.monotonic() < deadline and launcher.poll() is None, "the teacher did not start training"
            if (root / "sweep.json").exists():
                teacher = json.loads((root / "sweep.json").read_text())["order"][0]
                metrics = root / "runs" / teacher / "metrics.jsonl"
                if metrics.exists() and any(json.loads(x).get("step", 0) >= 10 for x in metrics.read_text().splitlines()):
                    break
            time.sleep(0.1)
        record = json.loads((root / "runs" / teacher / "job.json").read_text())
        controller = int(record["job_id"])
        workers = _children(controller)
        out = subprocess.run([sys.executable, "-m", "hpc_kd.launch", "cancel", str(root)], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "Traceback" not in out.stderr and "stopping the local launcher" in out.stderr, out.stderr
        assert launcher.wait(timeout=60) == launch.STOPPED
        deadline = time.monotonic() + 20
        while _alive(controller) or any(_alive(w) for w in workers):
            assert time.monotonic() < deadline, "a cancelled job is still running"
            time.sleep(0.1)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    # the teacher may have finished while cancel started (a race no test should bet on): what is
    # not done was cancelled and is shown as cancelled, never as failed
    runs = {p.name: p for p in (root / "runs").iterdir()}
    cancelled = [k for k, p in runs.items() if (p / "job.json").exists() and json.loads((p / "job.json").read_text()).get("cancelled")]
    unfinished = [k for k, p in runs.items() if not (p / "result.json").exists()]
    assert teacher in cancelled or teacher not in unfinished
    assert set(unfinished) <= set(cancelled) and not any((p / "error.json").exists() for p in runs.values())
    shown = subprocess.run([sys.executable, "-m", "hpc_kd.launch", "status", str(root)], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=60).stdout
    for key in unfinished:
        line = next(x for x in shown.splitlines() if x.strip().startswith(key))
        assert "cancelled" in line and "failed" not in line, shown
    if sigint == "default":
        return  # how the launcher was stopped does not change the resume: checked once, below, to keep CI short
    resumable = [k for k in cancelled if (runs[k] / "checkpoint.pt").exists()]
    again = subprocess.run([sys.executable, "-m", "hpc_kd.launch", str(sweep), "--executor", "local"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    for key in resumable:
        assert f"{key}: resuming from" in Path(json.loads((runs[key] / "job.json").read_text())["stdout"]).read_text()
    reference_plan = make_plan(tiny_model, tmp_path / "reference", **{k: v for k, v in sections.items() if k != "grid"})
    reference = run_plan(reference_plan, only=[teacher])[teacher]
    assert strip_times(json.loads((runs[teacher] / "result.json").read_text())) == strip_times(reference)


def test_cancel_of_a_sweep_with_nothing_running_cancels_nothing(tiny_model, tmp_path, capsys):
    cfg = tiny_config(tiny_model, tmp_path / "out", distill={"policy": "teacher"})
    sweep = write_yaml(tmp_path / "s.yaml", cfg)
    root = tmp_path / "out" / cfg["name"]
    assert launch.main([str(sweep), "--executor", "debug"]) == 0
    assert launch.main(["cancel", str(root)]) == 0
    assert "0 stage job(s) cancelled" in capsys.readouterr().out
    assert launch.main(["cancel", str(root), "--stage", "nope"]) == 2
    assert launch.main(["cancel", str(tmp_path)]) == 2


def _hold_lock(root: Path, holder: str, ignore_term: bool) -> subprocess.Popen:
    """A process that holds the sweep's launch lock as a launcher does, writing ``holder`` (the
    text a launcher writes: "pid N on HOST"; ``{pid}`` is its own), and that may ignore SIGTERM."""
    code = (f"import fcntl, os, signal, sys, time\n"
            f"{'signal.signal(signal.SIGTERM, signal.SIG_IGN)' if ignore_term else ''}\n"
            f"f = open({str(root / 'runs.lock')!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX)\n"
            f"f.seek(0); f.truncate(); f.write({holder!r}.format(pid=os.getpid()) + '\\n'); f.flush()\n"
            f"print('locked', flush=True); time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_cancel_kills_a_launcher_that_ignores_sigterm_and_reports_one_it_cannot_reach(tiny_model, tmp_path):
    """A launcher that outlives SIGTERM is killed after --timeout (exit 0, said on the console); a
    lock held from another machine cannot be stopped from here: exit 1, named, no traceback."""
    cfg = tiny_config(tiny_model, tmp_path / "out", distill={"policy": "teacher"})
    sweep = write_yaml(tmp_path / "s.yaml", cfg)
    root = tmp_path / "out" / cfg["name"]
    launch.SweepDir(root).write_sweep(launch.sweep_record(launch.load_plan(str(sweep), [])))
    cancel = [sys.executable, "-m", "hpc_kd.launch", "cancel", str(root), "--timeout", "2"]
    stubborn = _hold_lock(root, "pid {pid} on " + os.uname().nodename, ignore_term=True)
    try:
        out = subprocess.run(cancel, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        assert f"the launcher (pid {stubborn.pid}) did not stop within 2s of SIGTERM: killed it" in out.stderr
        assert stubborn.wait(timeout=30) == -signal.SIGKILL
    finally:
        stubborn.kill()
    remote = _hold_lock(root, "pid 4242 on another-host", ignore_term=False)
    try:
        out = subprocess.run(cancel, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert out.returncode == 1, out.stdout + out.stderr
        assert "held by pid 4242 on another-host, which is not a process of this machine" in out.stderr
        assert "Traceback" not in out.stderr and remote.poll() is None
    finally:
        remote.kill()


def test_unreadable_records_are_damage_shown_named_and_rebuilt(tiny_model, tmp_path, capsys):
    """A result.json / config.json that is not JSON is damage, not success: status shows the
    stage as damaged naming the file, aggregate reports the row instead of failing, and the
    relaunch sets the file aside and runs the stage again, to the same numbers. A job.json that
    cannot be read leaves a finished stage done."""
    cfg = tiny_config(tiny_model, tmp_path / "out", distill={"policy": "teacher"})
    sweep = write_yaml(tmp_path / "s.yaml", cfg)
    root = tmp_path / "out" / cfg["name"]
    assert launch.main([str(sweep), "--executor", "debug"]) == 0
    order = json.loads((root / "sweep.json").read_text())["order"]
    kinds = {key.split("-")[0]: key for key in order}
    assert set(kinds) == {"finetune", "cache", "distill"}
    before = {k: json.loads((root / "runs" / k / "result.json").read_text()) for k in order}
    garbage = {kinds["finetune"]: "result.json", kinds["cache"]: "config.json", kinds["distill"]: "result.json"}
    for key, name in garbage.items():
        (root / "runs" / key / name).write_text("this is not JSON {")
    (root / "runs" / kinds["distill"] / "job.json").write_text("[1, 2")
    capsys.readouterr()
    assert launch.main(["status", str(root)]) == 0
    shown = capsys.readouterr().out
    for key, name in garbage.items():
        line = next(x for x in shown.splitlines() if x.strip().startswith(key))
        assert "damaged" in line and f"{key}/{name} is unreadable" in line, shown
    assert "relaunch to set the damaged records aside" in shown
    from hpc_kd.aggregate import aggregate, collect

    text = aggregate(root)
    assert "2 row(s) could not be read" in text, text  # the teacher's and the student's (a cache has no row)
    assert f"{kinds['distill']}/result.json is unreadable" in text
    assert {r["run"]: r["state"] for r in collect(root)}[kinds["distill"]] == "damaged"
    capsys.readouterr()
    assert launch.main([str(sweep), "--executor", "debug"]) == 0
    err = capsys.readouterr().err
    for key, name in garbage.items():
        assert (root / "runs" / key / f"{name}.damaged").read_text() == "this is not JSON {"
        assert f"{key}/{name} could not be read: set aside as {name}.damaged" in err, err
    assert all(status.sweep_states(root, live=None)[k].state is status.State.DONE for k in order)
    for key in order:
        assert strip_times(json.loads((root / "runs" / key / "result.json").read_text())) == strip_times(before[key])
    # a finished stage whose job record is unreadable stays done
    (root / "runs" / kinds["finetune"] / "job.json").write_text("{")
    assert status.sweep_states(root, live=None)[kinds["finetune"]].state is status.State.DONE


def test_a_cache_rebuilt_by_a_student_is_said_on_the_launchers_console(tiny_model, tmp_path, capsys):
    cfg = tiny_config(tiny_model, tmp_path / "out", distill={"policy": "teacher"})
    sweep = write_yaml(tmp_path / "s.yaml", cfg)
    root = tmp_path / "out" / cfg["name"]
    assert launch.main([str(sweep), "--executor", "debug"]) == 0
    kinds = {key.split("-")[0]: key for key in json.loads((root / "sweep.json").read_text())["order"]}
    shutil.rmtree(root / "runs" / kinds["distill"])  # the student runs again, and reads the cache
    manifest = root / "runs" / kinds["cache"] / "logits" / "manifest.json"
    manifest.write_text(manifest.read_text()[:40])
    capsys.readouterr()
    assert launch.main([str(sweep), "--executor", "debug"]) == 0
    err = capsys.readouterr().err
    assert re.search(rf"\[rebuilt\] {kinds['cache']}: .*manifest.*; rebuilt by {kinds['distill']}", err), err
    assert launch.main([str(sweep), "--executor", "debug"]) == 0
    assert "[rebuilt]" not in capsys.readouterr().err  # said once, when it happened


def _own(run_path: Path, env: dict, hold_s: float) -> subprocess.Popen:
    """A process that owns a run folder (as a stage's worker does) for ``hold_s`` seconds."""
    code = ("import sys, time\nfrom hpc_kd.rundir import RunDir\n"
            f"with RunDir({str(run_path)!r}).owned():\n    print('owned', flush=True); time.sleep({hold_s})\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env={**os.environ, **env}, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "owned"
    return proc


def test_a_dying_worker_of_the_ended_job_is_not_taken_for_a_live_owner(tiny_model, tmp_path):
    """The launcher sees a local job end (its controller killed) while the job's worker, dying
    with it, still holds the run folder's lock: that is a failed run, not one "owned by pid N,
    which is still running it". A live owner from another job is still left alone."""
    from types import SimpleNamespace

    from hpc_kd import executors

    plan = make_plan(tiny_model, tmp_path)
    key = next(iter(plan.stages))
    path = plan.stages[key].run_dir(plan.root).path
    job = SimpleNamespace(job_id="424242", stderr=lambda: "", paths=SimpleNamespace(stderr=tmp_path / "log"))
    said = []
    worker = _own(path, {"SUBMITIT_LOCAL_JOB_ID": "424242"}, hold_s=1.0)  # exits a second later
    try:
        assert executors._finish(plan, key, job, time.time(), said.append) is executors.Action.FAILED
        assert said[-1].startswith(f"[failed] {key}: the job ended without a result"), said
    finally:
        worker.kill()
    (path / "error.json").unlink()
    other = _own(path, {"SUBMITIT_LOCAL_JOB_ID": "777"}, hold_s=60)  # another job's worker, alive
    try:
        assert executors._finish(plan, key, job, time.time(), said.append) is executors.Action.INFLIGHT
        assert said[-1].startswith(f"[busy] {key}: owned by pid {other.pid} "), said
    finally:
        other.kill()


def test_slurm_tests_skip_when_slurm_is_installed_but_its_controller_does_not_answer(tmp_path, monkeypatch):
    from .conftest import require_slurm

    fake = tmp_path / "bin" / "sinfo"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'sinfo: error: Unable to contact slurm controller (connect failure)' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("HPC_KD_REQUIRE_SLURM", raising=False)
    with pytest.raises(pytest.skip.Exception, match="its controller does not answer .*Unable to contact slurm controller"):
        require_slurm()
    monkeypatch.setenv("HPC_KD_REQUIRE_SLURM", "1")  # CI: a lost cluster fails
    with pytest.raises(pytest.fail.Exception, match="its controller does not answer"):
        require_slurm()
    fake.write_text("#!/bin/sh\necho up\n")
    require_slurm()  # it answers: the test runs


def test_a_launch_called_from_python_leaves_the_callers_sigterm_handler(tiny_model, tmp_path):
    cfg = tiny_config(tiny_model, tmp_path / "out", distill={"policy": "teacher"})
    sweep = write_yaml(tmp_path / "s.yaml", cfg)
    mine = lambda signum, frame: None  # noqa: E731
    previous = signal.signal(signal.SIGTERM, mine)
    try:
        assert launch.main([str(sweep), "--dry-run"]) == 0
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)
