"""Where every stage of a sweep stands: ``python -m hpc_kd.launch status results/<sweep>``.

A stage's state is derived, never stored alone: ``result.json`` means done; ``error.json``
(written by the job on an exception) means failed; otherwise the job record ``job.json`` (written
by the launcher when it submits) names a job that the scheduler is asked about (``squeue``,
then ``sacct`` for jobs it has forgotten). A stage whose input failed is *blocked*: it never ran
because of that input, whatever the scheduler says about its (cancelled) job.

States: ``done``, ``running``, ``pending`` (queued, or waiting for its inputs), ``failed``,
``blocked``, ``missing`` (never submitted, or its job is gone: a relaunch submits it).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Iterable, Mapping

from .rundir import SweepDir, sweep_dir_argument

#: a job the scheduler does not list yet is taken as queued for this long after its submission
#: (sacct lags a freshly submitted job by up to a few seconds).
GRACE_S = 120

RUNNING = {"RUNNING", "COMPLETING", "CONFIGURING", "SIGNALING", "STAGE_OUT", "RESIZING"}
QUEUED = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SUSPENDED", "RESV_DEL_HOLD", "SPECIAL_EXIT"}


class TextEnum(str, Enum):
    """An enum whose members are their text: printed, formatted and written to JSON as the
    value, and equal to it, so records and messages read as plain words."""

    __str__ = str.__str__
    __format__ = str.__format__


class State(TextEnum):
    """Where a stage stands (see the module docstring)."""

    DONE = "done"
    RUNNING = "running"
    PENDING = "pending"
    FAILED = "failed"
    BLOCKED = "blocked"
    MISSING = "missing"
    DAMAGED = "damaged"  # a record of it cannot be read: the next launch sets it aside and runs it again


@dataclass(frozen=True)
class StageStatus:
    key: str
    state: State
    job_id: str | None = None
    detail: str = ""  # failed: the reason; blocked: which input failed; missing: why
    log: str | None = None  # failed: where to look
    blocked_by: str | None = None  # the failed stage at the root of a block


@contextlib.contextmanager
def launch_lock(sweep: SweepDir, timeout_s: float | None = None):
    """Exclusive lock on a sweep's runs while a launcher plans and submits, so that two launches
    of the same sweep (or of sweeps sharing stages) never submit a stage twice."""
    runs_dir = sweep.runs
    sweep.root.mkdir(parents=True, exist_ok=True)
    with open(sweep.lock_file, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another launcher"
            print(f"[lock] waiting for {holder} to finish submitting ({runs_dir})", file=sys.stderr)
            started = time.monotonic()
            while True:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if timeout_s is not None and time.monotonic() - started > timeout_s:
                        raise TimeoutError(f"{runs_dir} stayed locked by {holder} for {timeout_s:.0f}s") from None
                    time.sleep(0.2)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
            fcntl.flock(f, fcntl.LOCK_UN)


# -- the scheduler -------------------------------------------------------------------------------


def _run(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def slurm_jobs(job_ids: list[str]) -> dict[str, dict] | None:
    """``{job id: {"State", "JobName", "Reason", "ExitCode"}}`` for the ids SLURM still knows;
    None when SLURM cannot be asked. Array tasks are ``<array id>_<index>``."""
    from submitit.slurm.slurm import SlurmInfoWatcher

    if not job_ids:
        return {}
    bases = sorted({j.split("_")[0] for j in job_ids})
    found: dict[str, dict] = {}
    out = _run(["squeue", "-h", "-r", "-t", "all", "-o", "%i|%j|%T|%r", "-j", ",".join(bases)])
    if out is None and _run(["squeue", "-h", "-o", "%i", "-u", "nobody"]) is None:
        return None  # squeue itself does not work: no SLURM here
    for line in (out or "").splitlines():
        jid, name, state, reason = (line.split("|") + [""] * 4)[:4]
        found[jid.strip()] = {"State": state.strip(), "JobName": name, "Reason": reason, "ExitCode": ""}
    if not all(j in found for j in job_ids):
        out = _run(["sacct", "-X", "-P", "-o", "JobID,JobName,State,Reason,ExitCode"]
                   + [a for b in bases for a in ("-j", b)])
        for jid, info in SlurmInfoWatcher().read_info(out or "").items():
            found.setdefault(jid, {**info, "State": info.get("State", "").split(" ")[0]})
    return found


def live_jobs(records: dict[str, dict]) -> dict[str, dict] | None:
    """Scheduler info for the SLURM jobs among ``records`` (stage key -> job record)."""
    ids = [r["job_id"] for r in records.values() if r.get("executor") == "slurm" and r.get("job_id")]
    return slurm_jobs(ids) if ids else {}


# -- states ------------------------------------------------------------------------------------


def _job_state(record: dict | None, live: dict | None) -> tuple[State, str, str | None]:
    """(state, detail, log) of a stage's job alone: running | pending | failed | missing."""
    if not record:
        return State.MISSING, "not submitted", None
    if record.get("damaged"):
        return State.MISSING, f"{record['damaged']}; a relaunch submits it again", None
    log = record.get("stderr")
    if record.get("cancelled"):  # `launch cancel`: not a failure; a relaunch resumes it
        return State.MISSING, f"cancelled {record['cancelled']} (a relaunch resumes it)", None
    if record.get("executor") != "slurm":  # local and debug jobs: a process on this machine
        if _alive(record):
            return State.RUNNING, f"{record.get('executor')} job {record.get('job_id')}", log
        return State.MISSING, f"{record.get('executor')} run ended without a result (interrupted)", log
    jid = record.get("job_id")
    if live is None:
        return State.PENDING, f"job {jid}: SLURM cannot be asked (last seen {record.get('state', 'submitted')})", log
    info = live.get(jid)
    if info is None:
        if time.time() - record.get("submitted_at", 0) < GRACE_S:
            return State.PENDING, f"job {jid} submitted", log
        return State.MISSING, f"job {jid} is unknown to SLURM (state wiped?)", log
    if record.get("name") and info.get("JobName") not in (None, "", record["name"]):
        return State.MISSING, f"job id {jid} now belongs to another job ({info.get('JobName')})", log
    state = info.get("State", "UNKNOWN")
    if state in RUNNING:
        return State.RUNNING, f"job {jid}", log
    reason = info.get("Reason", "")
    if state in QUEUED and "NeverSatisfied" in reason:
        return State.MISSING, f"job {jid} can never start (an input failed)", None
    if state in QUEUED:
        return State.PENDING, f"job {jid} {state.lower()}" + (f" ({reason})" if reason and reason != "None" else ""), log
    if state == "CANCELLED" and reason.startswith("Dependency"):
        return State.MISSING, f"job {jid} was cancelled before it ran (an input failed)", None
    exit_code = info.get("ExitCode", "")
    return State.FAILED, f"job {jid} {state}" + (f" (exit {exit_code})" if exit_code else ""), log


def _alive(record: dict) -> bool:
    """Is the process of a local or debug job still running (on this host)?"""
    import socket

    if record.get("host") != socket.gethostname():
        return False
    try:
        cmdline = Path(f"/proc/{int(record.get('job_id'))}/cmdline").read_bytes()
    except (OSError, TypeError, ValueError):
        return False
    return b"submitit" in cmdline or b"hpc_kd" in cmdline


def blocked_by(needs: Iterable[str], states: Mapping[str, StageStatus]) -> str | None:
    """The one rule for "blocked": is a stage blocked, and by what. It is when one of its inputs
    (``needs``, in order) failed or is blocked itself; what blocks it is the failed stage at the
    root: the first such input if it failed, else what blocks that input. None: not blocked."""
    for need in needs:
        st = states.get(need)
        if st is not None and st.state in (State.FAILED, State.BLOCKED):
            return st.blocked_by or st.key
    return None


def stage_states(root: Path, graph: dict[str, dict], live: dict | None | bool = True) -> dict[str, StageStatus]:
    """The state of every stage. ``graph``: stage key -> {"needs": [keys], "run": folder}, in
    topological order (see :func:`ordered`). ``live``: True asks the scheduler about the jobs on
    record; a dict is its answer, already known (None: it could not be asked)."""
    sweep = SweepDir(root)
    runs = {k: sweep.run(k, info) for k, info in graph.items()}
    records = {k: run.job() or _damaged_job(run) for k, run in runs.items() if not run.done()}
    records = {k: r for k, r in records.items() if r}
    if live is True:
        live = live_jobs(records)
    out: dict[str, StageStatus] = {}
    for key, info in graph.items():
        run, record = runs[key], records.get(key)
        jid = record.get("job_id") if record else None
        if run.done():
            out[key] = StageStatus(key, State.DONE, jid)
            continue
        damage = run.damage()
        if damage is not None and run.owner() is None:
            out[key] = StageStatus(key, State.DAMAGED, jid, f"{damage}; a relaunch runs it again")
            continue
        cause = blocked_by(info.get("needs", []), out)
        if run.failed():
            error = run.error()
            log = error.get("log") or (record or {}).get("stderr")
            out[key] = StageStatus(key, State.FAILED, jid, error.get("error", "failed"), log)
            continue
        state, detail, log = _job_state(record, live)
        owner = run.owner() if state is not State.RUNNING else None
        if owner is not None:  # a live process owns the folder, whatever the job record says
            state, detail = State.RUNNING, f"owned by {owner}"
        if state is State.FAILED and run.done():  # it finished since we looked
            out[key] = StageStatus(key, State.DONE, jid)
        elif cause is not None:
            out[key] = StageStatus(key, State.BLOCKED, jid, f"never ran because {cause} failed", None, cause)
        elif state is State.MISSING and run.checkpoint.is_file():
            out[key] = StageStatus(key, State.MISSING, jid, f"{detail}; resumes from its checkpoint", log)
        else:
            out[key] = StageStatus(key, state, jid, detail, log if state is State.FAILED else None)
    return out


def _damaged_job(run) -> dict | None:
    problem = run.job_damage()
    return {"damaged": problem} if problem else None


def sweep_graph(root: Path) -> dict[str, dict]:
    """``sweep.json``'s stages in topological order (its ``order``; JSON objects keep none)."""
    return ordered(SweepDir(root).read_sweep())


def ordered(sweep: dict) -> dict[str, dict]:
    stages = sweep["stages"]
    order = sweep.get("order") or list(dict.fromkeys([k for c in sweep.get("cells", []) for k in c["chain"]] + list(stages)))
    done: dict[str, dict] = {}
    while len(done) < len(stages):  # a topological sort that keeps ``order`` where it can
        for key in order:
            if key not in done and all(n in done or n not in stages for n in stages[key].get("needs", [])):
                done[key] = stages[key]
                break
        else:
            raise ValueError("sweep.json: the stage graph has a cycle")
    return done


def sweep_states(root: Path, live: dict | None | bool = True) -> dict[str, StageStatus]:
    return stage_states(root, sweep_graph(root), live)


def counts(states: dict[str, StageStatus]) -> str:
    tally = {s: sum(st.state is s for st in states.values()) for s in State}
    return ", ".join(f"{n} {s}" for s, n in tally.items() if n)


def first_line(text: str, width: int = 160) -> str:
    line = (text or "").strip().splitlines()[0] if (text or "").strip() else ""
    return line if len(line) <= width else line[: width - 3] + "..."


def report(root: Path, states: dict[str, StageStatus]) -> str:
    """One line per stage (state, job, what it waits for or why it stopped), then the reason
    and log of each failure."""
    graph = sweep_graph(root)
    lines = [f"{Path(root)}: {len(states)} stages: {counts(states)}"]
    for key, st in states.items():
        info = graph[key]
        label = info.get("role", "") + (f" {info['layers']}L" if info.get("layers") else "")
        if st.state is State.BLOCKED:
            state, detail = f"blocked (never ran because {st.blocked_by} failed)", ""
        else:
            state, detail = st.state, first_line(st.detail)
        job = f"job {st.job_id}" if st.job_id and st.job_id not in detail and st.state is not State.BLOCKED else ""
        lines.append(f"  {key:<22} {label:<12} {state:<8} {job:<10} {detail}".rstrip())
    for st in states.values():
        if st.state is State.FAILED:
            lines.append(f"\n{st.key} failed: {st.detail.strip()}")
            if st.log:
                lines.append(f"  log: {st.log}")
            lines.append(f"  folder: {SweepDir(root).run(st.key, graph[st.key]).path}")
    blocked = sum(st.state is State.BLOCKED for st in states.values())
    if any(st.state is State.DAMAGED for st in states.values()):
        lines.append("\nrelaunch to set the damaged records aside and run those stages again")
    if any(st.state is State.FAILED for st in states.values()):
        lines.append(f"\nrelaunch with --retry to run the failed stages{' and the ' + str(blocked) + ' they blocked' if blocked else ''} again")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    root = sweep_dir_argument("python -m hpc_kd.launch status", "Show where every stage of a launched sweep stands.", argv)
    if root is None:
        return 2
    print(report(root, sweep_states(root)), end="")
    return 0
