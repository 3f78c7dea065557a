"""The folders of a sweep and of its runs: the one place that names their files.

A sweep folder (:class:`SweepDir`, ``<output_root>/<name>/``) holds ``sweep.json`` (the plan, as
the launcher recorded it), ``runs/`` (one folder per stage), ``runs.lock`` (the launch lock),
``submitit/`` (the jobs' logs), the results table ``table.{md,csv,parquet}``, ``summary.md`` and
``plots/``.

A run's folder (:class:`RunDir`, ``runs/<kind>-<signature>/``) holds ``config.json`` (the stage's
settings, enough to rebuild it), ``metrics.jsonl`` (append-only records), ``result.json``
(written last: its presence means "done"), ``error.json`` (written by a job that raised: its
presence means "failed"), ``job.json`` (the launcher's record of the job that runs it),
``model/``, ``tutor/``, ``logits/``, ``tutor_cache/``, ``deepspeed/``, ``checkpoint.pt`` and
``.owner`` (the lock of the one live process that owns the folder, and who it is).
Every file is written to a temporary name and renamed. Nothing here is loaded with pickle: JSON
for records, safetensors / ``torch.load(weights_only=True)`` for tensors.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import socket
import sys
import time
from pathlib import Path

import torch

from .config import SCHEMA_VERSION


def signature(settings: dict) -> str:
    """Hash of the settings that change a result, plus the schema version."""
    blob = json.dumps({"schema": SCHEMA_VERSION, **settings}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def write_atomic(path: Path, data: bytes | str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: Path):
    return json.loads(Path(path).read_text())


_READABLE: dict[Path, tuple] = {}  # path -> (mtime_ns, size): last seen readable as a JSON object


def unreadable(path: Path) -> str | None:
    """Why a JSON record that exists cannot be read as a JSON object (None: it can, or it is
    absent)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    if _READABLE.get(path) == (st.st_mtime_ns, st.st_size):
        return None
    try:
        value = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (ValueError, OSError) as err:  # UnicodeDecodeError is a ValueError
        return f"{path} is unreadable ({type(err).__name__}: {str(err)[:80]})"
    if not isinstance(value, dict):
        return f"{path} is unreadable (a JSON {type(value).__name__}, not an object)"
    _READABLE[path] = (st.st_mtime_ns, st.st_size)
    return None


class RunBusy(RuntimeError):
    """The run folder is owned by another live process (see :meth:`RunDir.owned`)."""


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    # .owner: one live process owns a run folder while it trains or writes it (an exclusive
    # flock, released by the kernel when the process ends however it ends); it holds who.
    @property
    def owner_file(self) -> Path:
        return self.path / ".owner"

    @contextlib.contextmanager
    def owned(self, wait: bool = False, log=None):
        """Own the folder for the ``with`` block, before anything is written in it. Another live
        owner: wait for it (``wait``), else :class:`RunBusy` naming it."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.owner_file, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(f)
                if not wait:
                    raise RunBusy(f"{self.path} is owned by {holder}, which is still running it; "
                                  f"nothing was written (cancel it first to start over)") from None
                if log:
                    log(f"[lock] waiting for {holder} to finish with {self.path}")
                fcntl.flock(f, fcntl.LOCK_EX)
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            f.flush()
            yield self

    def owner(self) -> str | None:
        """Who owns the folder now (None: nobody alive does)."""
        try:
            f = open(self.owner_file)
        except FileNotFoundError:
            return None
        with f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return _holder(f)
            fcntl.flock(f, fcntl.LOCK_UN)
            return None

    @property
    def model(self) -> Path:
        return self.path / "model"

    @property
    def tutor(self) -> Path:
        """The tutor as it ended a TEID run (updated in online mode)."""
        return self.path / "tutor"

    @property
    def logits(self) -> Path:
        """A cache stage's logit shards and manifest (see :mod:`hpc_kd.cache`)."""
        return self.path / "logits"

    @property
    def tutor_cache(self) -> Path:
        """``tutor_update: refresh``: the tutor's logit cache of the current epoch."""
        return self.path / "tutor_cache"

    @property
    def deepspeed(self) -> Path:
        """The DeepSpeed engines' checkpoints of a run under way."""
        return self.path / "deepspeed"

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint.pt"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def config_file(self) -> Path:
        return self.path / "config.json"

    @property
    def result_file(self) -> Path:
        return self.path / "result.json"

    @property
    def error_file(self) -> Path:
        return self.path / "error.json"

    @property
    def job_file(self) -> Path:
        return self.path / "job.json"

    def done(self) -> bool:
        """Finished: ``result.json`` is there and no record of the run is damaged."""
        return self.result_file.is_file() and self.damage() is None

    # A record that exists but does not read as a JSON object (a disk error, a hand edit, a
    # truncated copy) is damage: the run is shown as damaged, never as done, and its next launch
    # sets the damaged files aside (``<name>.damaged``) and runs it again.
    def damage(self) -> str | None:
        """Why the run's records cannot be trusted (None: they can): the first of ``result.json``
        and ``config.json`` that exists but is not a JSON object, named."""
        for path in (self.result_file, self.config_file):
            problem = unreadable(path)
            if problem:
                return problem
        return None

    def job_damage(self) -> str | None:
        """``job.json`` unreadable: the job it recorded cannot be followed (see :meth:`job`)."""
        return unreadable(self.job_file)

    def set_aside_damaged(self) -> list[Path]:
        """Rename the damaged records to ``<name>.damaged`` (kept to inspect; a later one
        replaces an earlier); return their new paths."""
        moved = []
        for path in (self.result_file, self.config_file, self.job_file):
            if unreadable(path):
                os.replace(path, path.with_name(path.name + ".damaged"))
                moved.append(path.with_name(path.name + ".damaged"))
        return moved

    def result(self) -> dict:
        return read_json(self.result_file)

    def discard_result(self) -> None:
        self.result_file.unlink(missing_ok=True)

    def config(self) -> dict:
        return read_json(self.config_file)

    def start(self, config: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_json(self.config_file, config)

    def finish(self, result: dict) -> None:
        write_json(self.result_file, result)
        self.checkpoint.unlink(missing_ok=True)

    # error.json: why the run's last job failed; its presence means "failed" until the run is
    # started again (:meth:`clear_error`).
    def failed(self) -> bool:
        return self.error_file.is_file()

    def error(self) -> dict:
        try:
            return read_json(self.error_file)
        except ValueError:
            return {"error": "failed (error.json unreadable)"}

    def write_error(self, record: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_json(self.error_file, record)

    def clear_error(self) -> None:
        self.error_file.unlink(missing_ok=True)

    # job.json: the launcher's record of the job that runs (or ran) this stage.
    def job(self) -> dict | None:
        try:
            return read_json(self.job_file)
        except (FileNotFoundError, ValueError):
            return None

    def write_job(self, record: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_json(self.job_file, record)

    # metrics.jsonl: appended one line per record; on resume it is cut back to the number of
    # records the checkpoint knew about, so a resumed run's file equals an uninterrupted one's.
    def append_metrics(self, record: dict) -> None:
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()

    def metrics(self) -> list[dict]:
        if not self.metrics_file.exists():
            return []
        return [json.loads(line) for line in self.metrics_file.read_text().splitlines() if line.strip()]

    def truncate_metrics(self, count: int) -> None:
        lines = self.metrics_file.read_text().splitlines(keepends=True) if self.metrics_file.exists() else []
        write_atomic(self.metrics_file, "".join(lines[:count]))

    def save_checkpoint(self, state: dict) -> None:
        tmp = self.checkpoint.with_name(f".checkpoint.pt.tmp{os.getpid()}")
        torch.save(state, tmp)
        os.replace(tmp, self.checkpoint)

    def load_checkpoint(self) -> dict | None:
        if not self.checkpoint.exists():
            return None
        return torch.load(self.checkpoint, weights_only=True, map_location="cpu")


def local_pid(holder: str | None) -> int | None:
    """The process id in a lock's "pid N on HOST ..." text when HOST is this machine (None else)."""
    words = (holder or "").split()
    if len(words) >= 4 and words[0] == "pid" and words[1].isdigit() and words[3] == socket.gethostname():
        return int(words[1])
    return None


def _holder(f) -> str:
    f.seek(0)
    return f.read().strip() or "another process"


class SweepDir:
    """A launched sweep's folder: ``<output_root>/<name>/``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    def run(self, key: str, recorded: dict | None = None) -> RunDir:
        """Stage ``key``'s run folder: ``runs/<key>``, or where its ``sweep.json`` entry
        (``recorded``) says it is."""
        where = (recorded or {}).get("run")
        return RunDir(self.root / where) if where else RunDir(self.runs / key)

    @property
    def sweep_file(self) -> Path:
        return self.root / "sweep.json"

    def has_sweep(self) -> bool:
        return self.sweep_file.is_file()

    def read_sweep(self) -> dict:
        return read_json(self.sweep_file)

    def write_sweep(self, record: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        write_json(self.sweep_file, record)

    @property
    def lock_file(self) -> Path:
        """Held by a launcher while it plans and submits (:func:`hpc_kd.status.launch_lock`)."""
        return self.root / "runs.lock"

    @property
    def submitit(self) -> Path:
        """One folder per launch, holding its jobs' pickles and logs."""
        return self.root / "submitit"

    def table(self, ext: str) -> Path:
        """The results table: ``table.md``, ``table.csv`` or ``table.parquet``."""
        return self.root / f"table.{ext}"

    @property
    def summary_file(self) -> Path:
        return self.root / "summary.md"

    @property
    def plots(self) -> Path:
        return self.root / "plots"


def sweep_dir_argument(prog: str, description: str, argv) -> Path | None:
    """Parse ``SWEEP_DIR`` for a command that reads a launched sweep; None (after one line on
    stderr) when the folder holds no sweep.json."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("sweep_dir", help="results/<sweep>, the folder holding sweep.json")
    root = Path(parser.parse_args(argv).sweep_dir)
    if not SweepDir(root).has_sweep():
        print(f"error: {root} holds no sweep.json (launch a sweep into it first)", file=sys.stderr)
        return None
    problem = unreadable(SweepDir(root).sweep_file)
    if problem:
        print(f"error: {problem}; relaunch the sweep to write it again", file=sys.stderr)
        return None
    return root
