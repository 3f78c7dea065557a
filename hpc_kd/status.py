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
from pathlib import Path

from .rundir import read_json, write_json

JOB_FILE = "job.json"
#: a job the scheduler does not list yet is taken as queued for this long after its submission
#: (sacct lags a freshly submitted job by up to a few seconds).
GRACE_S = 120

RUNNING = {"RUNNING", "COMPLETING", "CONFIGURING", "SIGNALING", "STAGE_OUT", "RESIZING"}
QUEUED = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SUSPENDED", "RESV_DEL_HOLD", "SPECIAL_EXIT"}


@dataclass(frozen=True)
class StageStatus:
    key: str
    state: str  # done | running | pending | failed | blocked | missing
    job_id: str | None = None
    detail: str = ""  # failed: the reason; blocked: which input failed; missing: why
    log: str | None = None  # failed: where to look
    blocked_by: str | None = None  # the failed stage at the root of a block


# -- job records -------------------------------------------------------------------------------


def read_job(run_path: Path) -> dict | None:
    path = Path(run_path) / JOB_FILE
    try:
        return read_json(path)
    except (FileNotFoundError, ValueError):
        return None


def write_job(run_path: Path, record: dict) -> None:
    Path(run_path).mkdir(parents=True, exist_ok=True)
    write_json(Path(run_path) / JOB_FILE, record)


@contextlib.contextmanager
def launch_lock(runs_dir: Path, timeout_s: float | None = None):
    """Exclusive lock on a runs folder while a launcher plans and submits, so that two launches
    of the same sweep (or of sweeps sharing stages) never submit a stage twice."""
    runs_dir = Path(runs_dir)
    runs_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(runs_dir.with_name(runs_dir.name + ".lock"), "a+") as f:  # <root>/runs.lock
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


def _job_state(record: dict | None, live: dict | None) -> tuple[str, str, str | None]:
    """(state, detail, log) of a stage's job alone: running | pending | failed | missing."""
    if not record:
        return "missing", "not submitted", None
    log = record.get("stderr")
    if record.get("executor") != "slurm":  # local and debug jobs: a process on this machine
        if _alive(record):
            return "running", f"{record.get('executor')} job {record.get('job_id')}", log
        return "missing", f"{record.get('executor')} run ended without a result (interrupted)", log
    jid = record.get("job_id")
    if live is None:
        return "pending", f"job {jid}: SLURM cannot be asked (last seen {record.get('state', 'submitted')})", log
    info = live.get(jid)
    if info is None:
        if time.time() - record.get("submitted_at", 0) < GRACE_S:
            return "pending", f"job {jid} submitted", log
        return "missing", f"job {jid} is unknown to SLURM (state wiped?)", log
    if record.get("name") and info.get("JobName") not in (None, "", record["name"]):
        return "missing", f"job id {jid} now belongs to another job ({info.get('JobName')})", log
    state = info.get("State", "UNKNOWN")
    if state in RUNNING:
        return "running", f"job {jid}", log
    reason = info.get("Reason", "")
    if state in QUEUED and "NeverSatisfied" in reason:
        return "missing", f"job {jid} can never start (an input failed)", None
    if state in QUEUED:
        return "pending", f"job {jid} {state.lower()}" + (f" ({reason})" if reason and reason != "None" else ""), log
    if state == "CANCELLED" and reason.startswith("Dependency"):
        return "missing", f"job {jid} was cancelled before it ran (an input failed)", None
    exit_code = info.get("ExitCode", "")
    return "failed", f"job {jid} {state}" + (f" (exit {exit_code})" if exit_code else ""), log


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


def stage_states(root: Path, graph: dict[str, dict], live: dict | None | bool = True) -> dict[str, StageStatus]:
    """The state of every stage. ``graph``: stage key -> {"needs": [keys], "run": folder}, in
    topological order (see :func:`ordered`). ``live``: True asks the scheduler about the jobs on
    record; a dict is its answer, already known (None: it could not be asked)."""
    root = Path(root)
    runs = {k: root / info.get("run", f"runs/{k}") for k, info in graph.items()}
    records = {k: read_job(path) for k, path in runs.items() if not (path / "result.json").is_file()}
    records = {k: r for k, r in records.items() if r}
    if live is True:
        live = live_jobs(records)
    out: dict[str, StageStatus] = {}
    for key, info in graph.items():
        run, record = runs[key], records.get(key)
        jid = record.get("job_id") if record else None
        if (run / "result.json").is_file():
            out[key] = StageStatus(key, "done", jid)
            continue
        bad = [out[n] for n in info.get("needs", []) if n in out and out[n].state in ("failed", "blocked")]
        if (run / "error.json").is_file():
            error = _read_error(run / "error.json")
            log = error.get("log") or (record or {}).get("stderr")
            out[key] = StageStatus(key, "failed", jid, error.get("error", "failed"), log)
            continue
        state, detail, log = _job_state(record, live)
        if state == "failed" and (run / "result.json").is_file():  # it finished since we looked
            out[key] = StageStatus(key, "done", jid)
        elif bad:
            root_cause = bad[0].blocked_by or bad[0].key
            out[key] = StageStatus(key, "blocked", jid, f"never ran because {root_cause} failed", None, root_cause)
        elif state == "missing" and (run / "checkpoint.pt").is_file():
            out[key] = StageStatus(key, "missing", jid, f"{detail}; resumes from its checkpoint", log)
        else:
            out[key] = StageStatus(key, state, jid, detail, log if state == "failed" else None)
    return out


def _read_error(path: Path) -> dict:
    try:
        return read_json(path)
    except ValueError:
        return {"error": "failed (error.json unreadable)"}


def sweep_graph(root: Path) -> dict[str, dict]:
    """``sweep.json``'s stages in topological order (its ``order``; JSON objects keep none)."""
    return ordered(read_json(Path(root) / "sweep.json"))


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
    order = ("done", "running", "pending", "failed", "blocked", "missing")
    tally = {s: sum(st.state == s for st in states.values()) for s in order}
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
        if st.state == "blocked":
            state, detail = f"blocked (never ran because {st.blocked_by} failed)", ""
        else:
            state, detail = st.state, first_line(st.detail)
        job = f"job {st.job_id}" if st.job_id and st.job_id not in detail and st.state != "blocked" else ""
        lines.append(f"  {key:<22} {label:<12} {state:<8} {job:<10} {detail}".rstrip())
    for st in states.values():
        if st.state == "failed":
            lines.append(f"\n{st.key} failed: {st.detail.strip()}")
            if st.log:
                lines.append(f"  log: {st.log}")
            lines.append(f"  folder: {Path(root) / graph[st.key].get('run', f'runs/{st.key}')}")
    blocked = sum(st.state == "blocked" for st in states.values())
    if any(st.state == "failed" for st in states.values()):
        lines.append(f"\nrelaunch with --retry to run the failed stages{' and the ' + str(blocked) + ' they blocked' if blocked else ''} again")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from .aggregate import sweep_dir_argument

    root = sweep_dir_argument("python -m hpc_kd.launch status", "Show where every stage of a launched sweep stands.", argv)
    if root is None:
        return 2
    print(report(root, sweep_states(root)), end="")
    return 0
