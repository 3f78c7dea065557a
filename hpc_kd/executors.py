"""Running a plan's stages: ``slurm`` (submitit, one job per stage, ``afterok`` dependencies,
arrays for alike stages), ``local`` (submitit subprocesses on this machine, ``--jobs N`` at a
time, in dependency order) and ``debug`` (in this process, one after the other).

Every executor decides the same way (:func:`decide`): done stages are skipped, stages queued or
running on SLURM are left alone (their jobs become dependencies), failed stages run again only
with ``retry``, and a stage whose input failed is blocked (:func:`hpc_kd.status.blocked_by`
says so, once, in the stage's state). The decision and the submission happen
under :func:`hpc_kd.status.launch_lock`, so concurrent launches never submit a stage twice. Each
submitted stage gets a ``job.json`` record in its run folder.
"""
from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import time
import traceback
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

import submitit

from .config import RunConfig
from .resources import Profile, Resources, as_dict, describe, submitit_parameters
from .rundir import RunBusy, RunDir, local_pid
from .status import StageStatus, State, TextEnum, counts, first_line, stage_states

#: sbatch flags every stage job gets: a job whose input failed is cancelled, not left pending.
SLURM_FLAGS = {"kill-on-invalid-dep": "yes"}
#: how often a local run prints the progress of its running stages
PROGRESS_EVERY_S = 15


class StageJob(submitit.helpers.Checkpointable):
    """A stage as a submitit job. On SLURM's preemption or time-limit signal submitit calls
    :meth:`checkpoint` (inherited: resubmit this same object) and requeues the job; the stage then
    resumes from ``checkpoint.pt``, which the training loop writes every ``run.checkpoint_every``
    steps and at every epoch end, and ends as an uninterrupted run would."""

    def __init__(self, stage, root: str | Path, run_cfg: RunConfig, threads: int | None = None):
        self.stage, self.root, self.run_cfg, self.threads = stage, Path(root), run_cfg, threads
        self.key = stage.key  # as the launcher saw it

    def __call__(self) -> dict:
        # With several tasks, every task calls the stage as one rank (hpc_kd.distributed decides
        # who writes what); this wrapper only talks on rank 0.
        main = _rank() == 0
        if self.stage.key != self.key:
            # The job unpickles the stage with the code installed now: if that code computes
            # another signature, the results would land in a folder nobody waits for.
            raise RuntimeError(f"the hpc_kd code changed between submission and run: stage {self.key} "
                               f"is now {self.stage.key}; launch the sweep again")
        run = self.stage.run_dir(self.root)
        if main:
            state = f"resuming from {run.checkpoint}" if run.checkpoint.exists() else "starting"
            print(f"[hpc_kd] {self.stage.key}: {state}", flush=True)
        if os.environ.get("SUBMITIT_EXECUTOR") == "local":
            die_with_parent()
        run_cfg = self.run_cfg if self.run_cfg.threads or not self.threads else replace(self.run_cfg, threads=self.threads)
        try:
            self.stage(self.root, run_cfg)
        except RunBusy as err:  # another live process owns the folder: its record is not ours to touch
            if main:
                print(f"[hpc_kd] {self.stage.key}: {err}", file=sys.stderr, flush=True)
            raise
        except Exception as err:  # recorded for `status`; re-raised so the scheduler sees a failure
            if main:
                run.write_error({
                    "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(),
                    "job_id": _current_job_id(), "host": socket.gethostname(), "log": _current_log()})
            raise
        if main:
            print(f"[hpc_kd] {self.stage.key}: done", flush=True)
        return {"key": self.stage.key, "state": "done"}


def die_with_parent() -> None:
    """A local job's worker ends with its submitit controller (the process whose id the job
    record holds): killed with it, not orphaned to train on unseen (Linux ``PR_SET_PDEATHSIG``)."""
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return  # not Linux: the run folder's owner lock still keeps a second copy out
    controller = os.environ.get("SUBMITIT_LOCAL_JOB_ID", "")
    if controller.isdigit() and os.getppid() != int(controller):  # it died before the line above
        os._exit(1)


def _rank() -> int:
    for var in ("RANK", "SLURM_PROCID", "SUBMITIT_LOCAL_GLOBALID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def _current_job_id() -> str | None:
    if "SLURM_ARRAY_JOB_ID" in os.environ:
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID')}"
    return os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID")


def _current_log() -> str | None:
    try:
        return str(submitit.JobEnvironment().paths.stderr)
    except Exception:  # not inside a submitit job (debug executor)
        return None


# -- deciding ---------------------------------------------------------------------------------


class Action(TextEnum):
    """What a launch does with a stage."""

    DONE = "done"  # nothing: it is done
    INFLIGHT = "inflight"  # nothing: its job is queued or running (SLURM: a dependency)
    SUBMIT = "submit"  # run it
    FAILED = "failed"  # nothing: it failed (``retry`` runs it again)
    BLOCKED = "blocked"  # nothing: an input failed (``retry`` runs it again, after that input)


#: the action for each state, without ``retry``
ACTION = {State.DONE: Action.DONE, State.RUNNING: Action.INFLIGHT, State.PENDING: Action.INFLIGHT,
          State.FAILED: Action.FAILED, State.BLOCKED: Action.BLOCKED, State.MISSING: Action.SUBMIT,
          State.DAMAGED: Action.SUBMIT}


def graph(plan) -> dict[str, dict]:
    """Stage key -> {"needs", "run", ...}: the shape :func:`hpc_kd.status.stage_states` reads."""
    return {key: {"kind": s.kind, "role": s.role, "layers": s.depth, "needs": sorted({r.stage for r in s.inputs()}),
                  "run": os.path.relpath(s.run_dir(plan.root).path, plan.root)} for key, s in plan.stages.items()}


def decide(plan, states: dict[str, StageStatus], retry: bool = False) -> dict[str, Action]:
    """Stage key -> what to do with it, in topological order. ``states`` (of every stage of the
    plan, from :func:`hpc_kd.status.stage_states`) already say which stages are blocked and by
    what; ``retry`` runs the failed stages again, and so everything they blocked."""
    out: dict[str, Action] = {}
    for key in plan.stages:
        action = ACTION[states[key].state]
        out[key] = Action.SUBMIT if retry and action in (Action.FAILED, Action.BLOCKED) else action
    return out


def _new_record(executor: str, previous: dict | None, **fields) -> dict:
    history = []
    if previous:
        history = previous.get("previous", []) + [{k: previous.get(k) for k in ("executor", "job_id", "state", "submitted")}]
    return {"executor": executor, "attempt": len(history) + 1, "previous": history, "state": "submitted",
            "host": socket.gethostname(), "submitted_at": time.time(), "submitted": time.strftime("%Y-%m-%d %H:%M:%S"),
            **fields}


def _prepare(run: RunDir, log=print) -> dict | None:
    """Before (re)running a stage: set its damaged records aside, forget its last failure;
    return its previous job record."""
    for path in run.set_aside_damaged():
        log(f"[damaged] {path.with_suffix('')} could not be read: set aside as {path.name}; the stage runs again")
    run.clear_error()
    return run.job()


def launch_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]


# -- slurm ------------------------------------------------------------------------------------


@dataclass
class Submitted:
    job_id: str
    stdout: str
    stderr: str


def slurm_parameters(res: Resources, name: str, after: list[str] | tuple = ()) -> dict:
    """A stage job's SlurmExecutor parameters: its resources plus name and dependencies."""
    params = submitit_parameters(res, "slurm")
    params.update(job_name=name, additional_parameters=dict(SLURM_FLAGS))
    if after:
        params["dependency"] = "afterok:" + ":".join(after)
    return params


def sbatch_script(res: Resources, folder: str | Path, name: str, after: list[str] | tuple = (),
                  python: str = "python", array: int | None = None) -> str:
    """The sbatch script submitit writes for a stage job (a snapshot test pins it)."""
    from submitit.slurm.slurm import _make_sbatch_string

    command = f"{python} -u -m submitit.core._submit {shlex.quote(str(folder))}"
    return _make_sbatch_string(command=command, folder=folder, map_count=array, **slurm_parameters(res, name, after))


def slurm_submit(folder: Path, jobs: list[StageJob], res: Resources, name: str, after: list[str]) -> list[Submitted]:
    """Submit ``jobs`` with one resource request: one job, or one array for several."""
    executor = submitit.SlurmExecutor(folder=folder)
    executor.update_parameters(**slurm_parameters(res, name, after))
    if len(jobs) == 1:
        submitted = [executor.submit(jobs[0])]
    else:
        with executor.batch():
            submitted = [executor.submit(job) for job in jobs]
    return [Submitted(j.job_id, str(j.paths.stdout), str(j.paths.stderr)) for j in submitted]


def submit_slurm(plan, actions: dict[str, Action], states: dict[str, StageStatus], profile: Profile,
                 folder: Path, run_cfg: RunConfig, submit=None, log=print) -> dict[str, str]:
    """Submit every stage marked ``submit``, upstream first. Stages of one kind, with the same
    resources and the same dependencies, go as one job array. Returns stage key -> job id.
    ``submit``: how a group is submitted (default :func:`slurm_submit`; tests fake it)."""
    submit = submit or slurm_submit
    job_ids = {k: states[k].job_id for k, a in actions.items() if a is Action.INFLIGHT}
    todo = [k for k, a in actions.items() if a is Action.SUBMIT]
    wave: dict[str, int] = {}
    for key in todo:
        ups = [wave[r.stage] for r in plan.stages[key].inputs() if r.stage in wave]
        wave[key] = 1 + max(ups) if ups else 0
    stale = [states[k].job_id for k in todo if "can never start" in states[k].detail and states[k].job_id]
    if stale:
        subprocess.run(["scancel", *stale], capture_output=True, timeout=30)
    uid = folder.name.rsplit("-", 1)[-1]
    for level in sorted(set(wave.values())):
        groups: dict[tuple, list[str]] = {}
        for key in (k for k in todo if wave[k] == level):
            stage = plan.stages[key]
            after = tuple(sorted({job_ids[r.stage] for r in stage.inputs() if r.stage in job_ids}))
            groups.setdefault((stage.kind, profile.for_kind(stage.kind), after), []).append(key)
        for (kind, res, after), keys in groups.items():
            name = f"hpckd-{kind}-{uid}"
            previous = {k: _prepare(plan.stages[k].run_dir(plan.root), log) for k in keys}
            for k in keys:  # no job without a record: if this cannot be written, nothing is submitted
                plan.stages[k].run_dir(plan.root).write_job(_new_record("slurm", previous[k], job_id=None, state="submitting"))
            jobs = [StageJob(plan.stages[k], plan.root.resolve(), run_cfg, threads=res.cpus_per_task) for k in keys]
            for key, sub in zip(keys, submit(folder, jobs, res, name, list(after))):
                job_ids[key] = sub.job_id
                plan.stages[key].run_dir(plan.root).write_job(_new_record(
                    "slurm", previous[key], job_id=sub.job_id, name=name, folder=str(folder), stdout=sub.stdout,
                    stderr=sub.stderr, after=list(after), resources=as_dict(res)))
            array = f" as an array of {len(keys)}" if len(keys) > 1 else ""
            dep = f", after {','.join(after)}" if after else ""
            log(f"[submitted] {kind} x{len(keys)}{array}: job {job_ids[keys[0]].split('_')[0]} ({describe(res)}{dep})")
    return {k: job_ids[k] for k in todo}


def follow(plan, poll_s: float = 2.0, timeout_s: float | None = None, log=print) -> dict[str, StageStatus]:
    """The live view of ``--wait``: print each stage's state changes and, while anything runs,
    the progress of running stages, until nothing is queued or running."""
    shape, seen, last_summary, started = graph(plan), {}, "", time.monotonic()
    while True:
        states = stage_states(plan.root, shape)
        for key, st in states.items():
            if seen.get(key) != st.state:
                seen[key] = st.state
                what = f"never ran because {st.blocked_by} failed" if st.state is State.BLOCKED else first_line(st.detail)
                log(f"[{st.state}] {key} ({shape[key]['role']}) {what}".rstrip())
        active = [k for k, st in states.items() if st.state in (State.PENDING, State.RUNNING)]
        summary = counts(states) + "".join(f"; {k}: {p}" for k in active if (p := _progress(plan, k)))
        if summary != last_summary:
            log(f"  ... {summary}")
            last_summary = summary
        if not active:
            return states
        if timeout_s is not None and time.monotonic() - started > timeout_s:
            log(f"[wait] gave up after {timeout_s:.0f}s; the jobs keep running")
            return states
        time.sleep(poll_s)


def _progress(plan, key: str) -> str:
    """``epoch e/E step s`` from a running stage's metrics.jsonl (cheap: reads its tail)."""
    path = plan.stages[key].run_dir(plan.root).metrics_file
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 2048))
            last = f.read().decode(errors="replace").strip().splitlines()[-1]
    except (OSError, IndexError):
        return ""
    try:
        record = json.loads(last)
    except ValueError:
        return ""
    train = getattr(plan.stages[key], "train", None)
    epochs = f"/{train.epochs}" if train is not None else ""
    return f"epoch {record.get('epoch', 0) + 1}{epochs} step {record.get('step')}"


# -- local and debug --------------------------------------------------------------------------


def run_here(plan, actions: dict[str, Action], run_cfg: RunConfig, *, folder: Path | None = None, jobs: int = 1,
             profile: Profile | None = None, log=print, poll_s: float = 0.2) -> dict[str, Action]:
    """Run the ``submit`` stages on this machine in dependency order: in this process when
    ``folder`` is None (debug), else as up to ``jobs`` submitit subprocesses. Returns each
    stage's outcome: done | failed | blocked | inflight (left to SLURM) ."""
    outcome = {k: a for k, a in actions.items() if a is not Action.SUBMIT}
    waiting = [k for k, a in actions.items() if a is Action.SUBMIT]
    running: dict[str, tuple] = {}
    executor = None  # made when a first job starts: a launch that starts nothing leaves no folder
    cpus = os.cpu_count() or 1
    shown, next_show = "", time.monotonic() + PROGRESS_EVERY_S
    try:
        while waiting or running:
            if folder is not None and time.monotonic() > next_show:
                now = "; ".join(f"{k}: {p}" for k in running if (p := _progress(plan, k)))
                if now and now != shown:
                    log(f"  ... {now}")
                shown, next_show = now, time.monotonic() + PROGRESS_EVERY_S
            for key in list(waiting):
                ins = [outcome.get(r.stage) for r in plan.stages[key].inputs()]
                if any(i in (Action.FAILED, Action.BLOCKED, Action.INFLIGHT) for i in ins):
                    waiting.remove(key)
                    outcome[key] = Action.BLOCKED
                    cause = next(r.stage for r in plan.stages[key].inputs() if outcome.get(r.stage) is not Action.DONE)
                    why = f"is still queued or running (job {states_note(plan, cause)})" if outcome[cause] is Action.INFLIGHT \
                        else "did not finish"
                    log(f"[skip] {key}: never ran, because {cause} {why}")
                elif all(i is Action.DONE for i in ins) and len(running) < jobs:
                    waiting.remove(key)
                    if folder is not None and executor is None:
                        executor = submitit.LocalExecutor(folder=folder)
                    # the CPUs are split between the jobs that can run now: a stage that runs
                    # alone (the teacher, its cache, the tutor) gets all of them
                    ready = sum(all(outcome.get(r.stage) is Action.DONE for r in plan.stages[k].inputs()) for k in waiting)
                    threads = max(1, cpus // min(jobs, len(running) + 1 + ready))
                    try:
                        running[key] = _start(plan, key, run_cfg, executor, profile, threads, log)
                    except OSError as err:  # its folder cannot be written (checked at launch; changed since)
                        outcome[key] = Action.FAILED
                        log(f"[failed] {key}: cannot write {err.filename or plan.stages[key].run_dir(plan.root).path} "
                            f"({err.strerror or err}); it did not start")
            for key, (job, started) in list(running.items()):
                if job is None or job.done():
                    del running[key]
                    outcome[key] = _finish(plan, key, job, started, log)
            if running and folder is not None:
                time.sleep(poll_s)
    except KeyboardInterrupt:  # Ctrl-C, SIGTERM, `launch cancel`: the running jobs stop with the launcher
        for job, _ in running.values():
            if job is not None:
                _kill_local(job)
        raise
    return outcome


def _kill_local(job) -> None:
    """Kill a local job's controller; its worker dies with it (:func:`die_with_parent`). Not
    submitit's ``cancel``, a SIGINT, which a controller started from a launcher that ignores SIGINT
    (the background of a script) ignores too."""
    import signal

    try:
        os.kill(int(job.job_id), signal.SIGKILL)
    except (ProcessLookupError, ValueError):
        pass


def states_note(plan, key: str) -> str:
    record = plan.stages[key].run_dir(plan.root).job() or {}
    return f"{record.get('executor')} {record.get('job_id')}"


def _start(plan, key, run_cfg, executor, profile, threads, log):
    stage = plan.stages[key]
    run = stage.run_dir(plan.root)
    previous = _prepare(run, log)
    log(f"[run] {key} ({stage.role}" + (f", {stage.depth} layers)" if stage.depth else ")"))
    job = StageJob(stage, plan.root.resolve(), run_cfg, threads=None if executor is None else threads)
    started = time.time()
    if executor is None:  # debug: right here, right now
        run.write_job(_new_record("debug", previous, job_id=str(os.getpid())))
        try:
            job()
        except Exception:
            pass  # StageJob wrote error.json
        return None, started
    res = (profile or Profile()).for_kind(stage.kind)
    executor.update_parameters(**submitit_parameters(res, "local"))
    run.write_job(_new_record("local", previous, job_id=None, state="starting"))  # no job without a record
    submitted = executor.submit(job)
    run.write_job(_new_record("local", previous, job_id=submitted.job_id, folder=str(executor.folder),
                              stdout=str(submitted.paths.stdout), stderr=str(submitted.paths.stderr)))
    return submitted, started


#: how long a local job's worker may outlive its ended controller before its lock is taken for
#: another process's
OWNER_GRACE_S = 10


def _worker_of(pid: int | None, controller: str) -> bool:
    """Is process ``pid`` (of this machine) a worker of the local job whose controller is
    ``controller``? Its environment says (submitit sets ``SUBMITIT_LOCAL_JOB_ID``)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except (OSError, TypeError):
        return False
    return f"SUBMITIT_LOCAL_JOB_ID={controller}".encode() in environ


def _finish(plan, key, job, started, log) -> Action:
    run = plan.stages[key].run_dir(plan.root)
    seconds = time.time() - started
    if run.done():
        log(f"[done] {key} in {seconds:.0f}s")
        for ref in plan.stages[key].inputs():  # a damaged input cache it rebuilt (said in its job's log too)
            source = plan.stages[ref.stage].run_dir(plan.root)
            rebuilt = source.result().get("rebuilt") if source.done() else None
            if rebuilt and rebuilt.get("at", 0) >= started:
                log(f"[rebuilt] {ref.stage}: {first_line(rebuilt.get('why', ''))}; rebuilt by {key}")
        return Action.DONE
    if (run.job() or {}).get("cancelled"):
        log(f"[cancelled] {key}: stopped by launch cancel; a relaunch resumes it")
        return Action.BLOCKED
    owner = run.owner()
    deadline = time.monotonic() + OWNER_GRACE_S
    while owner is not None and job is not None and _worker_of(local_pid(owner), job.job_id) and time.monotonic() < deadline:
        time.sleep(0.1)  # the job's own worker, dying with its controller, holds the lock a moment longer
        owner = run.owner()
    if owner is not None:  # another live process owns the folder (its job goes on): not a failure
        log(f"[busy] {key}: owned by {owner}, which is still running it; this launch leaves it alone")
        return Action.INFLIGHT
    if not run.failed():  # killed before the stage could say why
        detail = "the job ended without a result"
        if job is not None:
            tail = (job.stderr() or "").strip().splitlines()[-3:]
            detail += (": " + " | ".join(tail)) if tail else ""
        run.write_error({"error": detail, "log": str(job.paths.stderr) if job is not None else None})
    log(f"[failed] {key}: {first_line(run.error().get('error', ''))} (details: {run.error_file})")
    return Action.FAILED


# -- cancel -----------------------------------------------------------------------------------


def cancel(root: Path, graph: dict[str, dict], states: dict[str, StageStatus], keys: list[str] | None,
           log=print) -> list[str]:
    """Stop the queued and running jobs of the stages ``keys`` (default: all) and of the stages
    that need them, and record it in their job records; finished stages are left alone. SLURM
    jobs (array elements included) by ``scancel``; local jobs by killing their controller, whose
    worker dies with it, and the process that owns the run folder. Returns the cancelled keys."""
    import signal

    from .rundir import SweepDir

    wanted = set(graph) if not keys else set(keys)
    for key in graph:  # what needs a cancelled stage cannot run either
        if set(graph[key].get("needs", [])) & wanted:
            wanted.add(key)
    sweep, stopped, slurm_ids = SweepDir(root), [], []
    for key in graph:
        st = states[key]
        if key not in wanted or st.state not in (State.RUNNING, State.PENDING):
            continue
        run = sweep.run(key, graph[key])
        record = run.job() or {}
        if record.get("executor") == "slurm" and record.get("job_id"):
            slurm_ids.append(str(record["job_id"]))
        elif record.get("host") == socket.gethostname():
            pids = [record.get("job_id")]
            pids.append(local_pid(run.owner()))
            for pid in pids:
                if str(pid).isdigit() and int(pid) != os.getpid():
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        run.write_job({**record, "cancelled": time.strftime("%Y-%m-%d %H:%M:%S"), "state": "cancelled"})
        stopped.append(key)
        log(f"[cancelled] {key} ({st.state}{', job ' + str(record.get('job_id')) if record.get('job_id') else ''})")
    if slurm_ids:
        out = subprocess.run(["scancel", *slurm_ids], capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            log(f"scancel: {out.stderr.strip()}")
    return stopped
