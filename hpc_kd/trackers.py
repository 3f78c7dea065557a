"""Experiment trackers: TensorBoard, Weights & Biases and MLflow show a sweep as it runs.

``metrics.jsonl`` stays the record; a tracker mirrors it and decides nothing. With
``run.trackers: [tensorboard, wandb, mlflow]`` rank 0 of every stage sends, as it writes them:

- at the start, the stage's settings as flat dotted keys, its key, kind, signature and role;
- every record appended to ``metrics.jsonl``, each number as ``<type>/<key>`` at the student's
  global step (``train/loss``, ``train/lr``, ``train/teacher_share``, ``train/selection/...``
  every ``run.log_every`` steps; ``epoch/val_accuracy``, ``epoch/selection/teacher_share``, ...
  per epoch), and with each train record ``throughput/steps_per_s`` and ``examples_per_s``
  (measured here: wall-clock numbers never enter ``metrics.jsonl``);
- at the end, every number of ``result.json`` as ``result/...`` (test metrics, the collapse
  flag, the parameter count): the run's summary.

Sweep structure: wandb group = sweep name, job_type = stage kind, name = stage key, id = sweep
name + stage key, tags = role / depth / policy / seed; MLflow experiment = sweep name, one run per
stage (tag ``hpc_kd.stage``) with its settings as params; TensorBoard one folder per stage.
Where they write (each tool's own environment variables first): ``<sweep>/tensorboard/<stage>/``;
``$WANDB_DIR`` or ``<sweep>/wandb/`` (``WANDB_MODE=offline`` on a cluster without network, then
``wandb sync``), project ``$WANDB_PROJECT`` or ``hpc_kd``; ``$MLFLOW_TRACKING_URI`` or the file
store ``<sweep>/mlruns/`` (``mlflow ui --backend-store-uri results/<name>/mlruns``).

A resumed run cuts ``metrics.jsonl`` back to its checkpoint and writes the discarded records
again; no tracker shows a step twice. TensorBoard purges them (``purge_step``) and gets them again;
MLflow keeps the first value of each (metric, step); wandb (``resume="allow"``, the same id) is
not sent them a second time. TensorBoard and MLflow also get any kept record they lack (a tracker
switched on for a run under way); wandb offline cannot know, so it starts where the run resumes.
A job killed outright (SIGKILL) loses no TensorBoard or MLflow record (both written at once);
wandb's service writes the run's file every second, so wandb may miss the killed session's last
second (``metrics.jsonl`` has it).

A tracker that cannot start (not installed, no network, no login) or fails to log is named once on
stderr and dropped; the run goes on and its files are the same as without it.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
import typing
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol

from .config import Tracker as TrackerName
from .rundir import RunDir, SweepDir

#: every tracker name ``run.trackers`` allows
NAMES: tuple[str, ...] = typing.get_args(TrackerName)
#: what ``result.json`` holds for people to read, not numbers to plot
_SKIP = {"pred", "correct", "labels", "nll", "tokens", "confusion", "continuations", "data_fingerprints",
         "selection_per_epoch", "producer"}


@dataclass(frozen=True)
class StageInfo:
    """What a tracker knows of the stage it mirrors."""

    sweep: str
    root: Path
    key: str
    kind: str
    signature: str
    role: str
    #: the stage's settings, flattened to dotted keys (the signature's input)
    config: dict[str, Any]
    #: role, depth, policy, seed, iteration: where the stage has them
    tags: dict[str, str]
    batch_size: int | None = None

    @classmethod
    def of(cls, stage, root: Path) -> "StageInfo":
        tags = {"role": stage.role}
        for name, attr in (("depth", "depth"), ("policy", "policy"), ("seed", "seed"), ("iteration", "iteration")):
            value = getattr(stage, attr, None)
            if value is not None:
                tags[name] = str(value)
        train = getattr(stage, "train", None)
        return cls(root.name, root, stage.key, stage.kind, stage.signature, stage.role, flatten(stage.settings()), tags,
                   getattr(train, "batch_size", None))

    @property
    def header(self) -> dict[str, Any]:
        """The config a tracker shows: the settings plus the stage's identity."""
        return {"stage.key": self.key, "stage.kind": self.kind, "stage.signature": self.signature,
                "stage.role": self.role, **self.config}


@dataclass(frozen=True)
class Point:
    """The numbers of one record at one step."""

    step: int
    values: dict[str, float]


def flatten(settings: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> one level of dotted keys (lists and scalars kept as they are)."""
    out: dict[str, Any] = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def scalars(record: dict, prefix: str) -> dict[str, float]:
    """Every number (and yes/no, as 0/1) of ``record``, nested dicts included, as ``prefix/key/...``."""
    out: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}/{key}"
        if isinstance(value, dict) and key not in _SKIP:
            out.update(scalars(value, name))
        elif isinstance(value, (bool, int, float)) and key not in _SKIP:
            out[name] = float(value)
    return out


def point(record: dict) -> Point:
    """A ``metrics.jsonl`` record as a tracker sees it."""
    return Point(int(record["step"]), scalars({k: v for k, v in record.items() if k not in ("type", "step")},
                                              record["type"]))


def summary(result: dict) -> Point:
    return Point(int(result.get("steps") or 0), scalars(result, "result"))


def _warn(message: str) -> None:
    print(f"[trackers] {message}", file=sys.stderr, flush=True)


class Tracker(Protocol):
    """One tracker's view of one stage."""

    name: str

    def rewind(self, kept: list[Point], discarded: list[Point]) -> None:
        """``metrics.jsonl`` was cut back to ``kept`` (a start or a resume); ``discarded`` were
        sent before (if this tracker was on) and the run will produce them again."""

    def log(self, point: Point) -> None: ...

    def finish(self, summary: Point, result: dict) -> None:
        """The run ended: its result, once."""

    def close(self) -> None:
        """The run stopped without a result (an error, a kill the process saw)."""


# -- TensorBoard --------------------------------------------------------------------------------


def after_existing_event_files(folder: Path, limit_s: float = 2.0) -> None:
    """Wait (at most ``limit_s``: a file stamped further ahead is another clock's, not this
    second's) until a new event file in ``folder`` would sort after the ones there.
    TensorBoard reads a folder's files in name order, ``events.out.tfevents.<second>.<host>.<pid>…``;
    a resumed writer's purge of the discarded steps applies only to events read before it. So if
    the killed process wrote in this same second, the pids would decide the order, as strings, and
    the killed one's last steps could be read after the purge and kept."""
    seconds = [int(parts[3]) for p in folder.glob("events.out.tfevents.*")
               if len(parts := p.name.split(".")) > 3 and parts[3].isdigit()]
    deadline = time.time() + limit_s
    while seconds and int(time.time()) <= max(seconds) and time.time() < deadline:
        time.sleep(0.05)


class TensorBoard:
    """Event files in ``<sweep>/tensorboard/<stage>/``, flushed after every record so that a killed
    job loses none; a resume purges the discarded steps (``purge_step``) and writes them again."""

    name = "tensorboard"

    def __init__(self, info: StageInfo):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.info, self._writer_class, self.writer = info, SummaryWriter, None
        self.folder = tensorboard_folder(info.root) / info.key

    def _open(self, purge_step: int | None = None) -> bool:
        fresh = not any(self.folder.glob("events.out.tfevents.*"))
        if not fresh:
            after_existing_event_files(self.folder)
        self.writer = self._writer_class(str(self.folder), purge_step=None if fresh else purge_step, flush_secs=30)
        if fresh:
            table = "\n".join(f"| {k} | {json.dumps(v)} |" for k, v in self.info.header.items())
            self.writer.add_text("config", "| key | value |\n|---|---|\n" + table, 0)
            self.writer.add_text("tags", ", ".join(f"{k}={v}" for k, v in self.info.tags.items()), 0)
        return fresh

    def rewind(self, kept, discarded):
        if self.writer is not None:
            self.writer.close()
        purge = min((p.step for p in discarded), default=None)
        if self._open(purge):
            replay = kept
        else:
            replay = [p for p in kept if purge is not None and p.step >= purge]
        for p in replay:
            self.log(p)

    def log(self, point):
        if self.writer is None:
            self._open()
        for key, value in point.values.items():
            self.writer.add_scalar(key, value, point.step)
        self.writer.flush()

    def finish(self, summary, result):
        self.log(summary)
        self.close()

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def tensorboard_folder(root: Path) -> Path:
    return Path(root) / "tensorboard"


# -- Weights & Biases ---------------------------------------------------------------------------


def wandb_id(sweep: str, key: str) -> str:
    """A wandb run id (letters, digits, - and _; at most 64) from the sweep's name and a key."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", sweep)[: 63 - len(key)] + "-" + key


def _wandb_init(info_root: Path, **kwargs):
    import wandb

    settings = {"console": "off", "silent": True}
    if "x_transaction_log_flush_interval" in wandb.Settings.model_fields:
        # to the run's file every second, not every 15: a job killed outright loses a second of records
        settings["x_transaction_log_flush_interval"] = 1.0
    options = {"dir": None if os.environ.get("WANDB_DIR") else str(info_root),
               "project": os.environ.get("WANDB_PROJECT", "hpc_kd"), "resume": "allow", "reinit": "create_new",
               "settings": wandb.Settings(**settings)}
    return wandb.init(**options, **kwargs)


class WandB:
    """A wandb run per stage, resumed (``resume="allow"``) by a requeued job."""

    name = "wandb"

    def __init__(self, info: StageInfo):
        self.run = _wandb_init(info.root, group=info.sweep, job_type=info.kind, name=info.key,
                               id=wandb_id(info.sweep, info.key), config=info.header,
                               tags=[f"{k}={v}" for k, v in info.tags.items()])
        self.skip = 0

    def rewind(self, kept, discarded):
        # wandb only appends: what it was sent stays; the records a resume writes again are not resent
        self.skip = len(discarded)
        if not self.run.resumed and not self.run.offline:  # new to the server: give it the run so far
            for p in kept:
                self.run.log(p.values, step=p.step)

    def log(self, point):
        if self.skip:
            self.skip -= 1
            return
        self.run.log(point.values, step=point.step)

    def finish(self, summary, result):
        self.run.summary.update(summary.values)
        self.run.finish()
        self.run = None

    def close(self):
        if self.run is not None:
            self.run.finish(exit_code=1)
            self.run = None


# -- MLflow ---------------------------------------------------------------------------------------


def mlflow_client(root: Path):
    """A client of ``$MLFLOW_TRACKING_URI``, else of the file store ``<sweep>/mlruns/`` (which MLflow 3
    wants allowed explicitly: ``MLFLOW_ALLOW_FILE_STORE``)."""
    from mlflow.tracking import MlflowClient

    uri = os.environ.get("MLFLOW_TRACKING_URI") or (Path(root) / "mlruns").resolve().as_uri()
    if uri.startswith("file:") or "://" not in uri:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MlflowClient(uri)


def mlflow_run(client, sweep: str, key: str, tags: dict[str, str]):
    """The run tagged ``hpc_kd.stage = key`` in experiment ``sweep`` (made if missing), set running."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(sweep)
    if experiment is None:
        try:
            experiment_id = client.create_experiment(sweep)
        except MlflowException:  # another stage of the sweep made it meanwhile
            experiment_id = client.get_experiment_by_name(sweep).experiment_id
    else:
        experiment_id = experiment.experiment_id
    found = client.search_runs([experiment_id], filter_string=f"tags.`hpc_kd.stage` = '{key}'", max_results=1)
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0]
    return client.create_run(experiment_id, run_name=key, tags={"hpc_kd.stage": key, **tags})


class MLflow:
    """An MLflow run per stage. MLflow keeps every value it is given, so this logs each (metric,
    step) once: the first value stays."""

    name = "mlflow"

    def __init__(self, info: StageInfo):
        from mlflow.entities import Metric, Param

        self._metric = Metric
        self.client = mlflow_client(info.root)
        tags = {"hpc_kd.signature": info.signature, "hpc_kd.kind": info.kind, "hpc_kd.sweep_dir": str(info.root),
                **info.tags}
        run = mlflow_run(self.client, info.sweep, info.key, tags)
        self.run_id = run.info.run_id
        params = [Param(k, _param(v)) for k, v in info.header.items() if k not in run.data.params]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per call
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        self.seen = {(key, m.step) for key in run.data.metrics for m in self.client.get_metric_history(self.run_id, key)}

    def rewind(self, kept, discarded):
        for p in kept:  # those it has already are skipped
            self.log(p)

    def log(self, point):
        now = int(time.time() * 1000)
        metrics = [self._metric(k, v, now, point.step) for k, v in point.values.items() if (k, point.step) not in self.seen]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])
        self.seen.update((m.key, m.step) for m in metrics)

    def finish(self, summary, result):
        self.log(summary)
        self.client.log_dict(self.run_id, result, "result.json")
        self.client.set_terminated(self.run_id, "FINISHED")
        self.run_id = None

    def close(self):
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, "FAILED")
            self.run_id = None


def _param(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 6000 else text[:5997] + "..."  # MLflow's limit on a param's value


BACKENDS = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}


# -- the fan-out ----------------------------------------------------------------------------------


class Mirror:
    """Sends one stage's records to its trackers. A tracker that raises is named once and dropped:
    the run never waits for, or fails because of, a tracker."""

    def __init__(self, info: StageInfo, names):
        self.info, self.trackers = info, []
        for name in names:
            try:
                self.trackers.append(BACKENDS[name](info))
            except Exception as err:  # noqa: BLE001 - any failure of a tracker is the tracker's
                hint = f" (pip install -e '.[{name}]')" if isinstance(err, ImportError) else ""
                _warn(f"{name} could not start for {info.key}{hint}: {type(err).__name__}: {err}; "
                      f"the run goes on without it (metrics.jsonl has every record)")
        self._clock: tuple[int, float] | None = None

    def _each(self, method: str, *args) -> None:
        for tracker in list(self.trackers):
            try:
                getattr(tracker, method)(*args)
            except Exception as err:  # noqa: BLE001
                self.trackers.remove(tracker)
                _warn(f"{tracker.name} failed for {self.info.key} ({type(err).__name__}: {err}); the run goes on "
                      f"without it (metrics.jsonl has every record)")
                try:
                    tracker.close()
                except Exception:  # noqa: BLE001
                    pass

    def rewind(self, kept: list[dict], discarded: list[dict]) -> None:
        self._clock = None
        self._each("rewind", [point(r) for r in kept], [point(r) for r in discarded])

    def record(self, record: dict) -> None:
        p = point(record)
        if record["type"] == "train":
            now = time.monotonic()
            if self._clock is not None and p.step > self._clock[0] and now > self._clock[1]:
                rate = (p.step - self._clock[0]) / (now - self._clock[1])
                extra = {"throughput/steps_per_s": rate}
                if self.info.batch_size:
                    extra["throughput/examples_per_s"] = rate * self.info.batch_size
                p = Point(p.step, {**p.values, **extra})
            self._clock = (p.step, now)
        self._each("log", p)

    def finish(self, result: dict) -> None:
        self._each("finish", summary(result), result)
        self.trackers = []

    def close(self) -> None:
        self._each("close")
        self.trackers = []


class MirroredRun(RunDir):
    """A run folder whose records also go to the trackers: what ``metrics.jsonl`` gains, loses (a
    resume) and the result."""

    def __init__(self, path, mirror: Mirror):
        super().__init__(path)
        self.mirror = mirror

    def append_metrics(self, record: dict) -> None:
        super().append_metrics(record)
        self.mirror.record(record)

    def truncate_metrics(self, count: int) -> None:
        before = _records(self.metrics_file)
        super().truncate_metrics(count)
        self.mirror.rewind(before[:count], before[count:])

    def finish(self, result: dict) -> None:
        super().finish(result)
        self.mirror.finish(result)


def _records(path: Path) -> list[dict]:
    """The complete records of ``metrics.jsonl`` (a line cut by a kill ends them)."""
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            out.append(json.loads(line))
        except ValueError:
            break
    return out


@contextmanager
def mirror(run: RunDir, stage, root: Path, names) -> Iterator[RunDir]:
    """``run``, mirrored to the trackers ``names`` for the ``with`` block (on rank 0; elsewhere, or
    with no trackers, ``run`` itself)."""
    from . import distributed

    if not names or not distributed.current().is_main:
        yield run
        return
    fan = Mirror(StageInfo.of(stage, Path(root)), names)
    try:
        yield MirroredRun(run.path, fan)
    finally:
        fan.close()  # a no-op after a result


# -- the results table (python -m hpc_kd.aggregate results/<name> --push ...) -------------------


def push(root: str | Path, names) -> str:
    """Send the sweep's table and summary (as written by the aggregator) to the trackers ``names``;
    return what to print."""
    root = Path(root)
    sweep = SweepDir(root)
    files = [f for f in (sweep.table("md"), sweep.table("csv"), sweep.table("parquet"), sweep.summary_file) if f.exists()]
    lines = []
    for name in names:
        try:
            lines.append(f"table pushed to {name}: {PUSH[name](root, sweep, files)}")
        except Exception as err:  # noqa: BLE001
            lines.append(f"[trackers] {name}: the table could not be pushed ({type(err).__name__}: {err})")
    return "".join(f"{line}\n" for line in lines)


def _push_wandb(root: Path, sweep: SweepDir, files: list[Path]) -> str:
    import pandas as pd
    import wandb

    run = _wandb_init(root, group=root.name, job_type="table", name=f"{root.name}-table",
                      id=wandb_id(root.name, "table"))
    try:
        if sweep.table("csv").exists():
            run.log({"results": wandb.Table(dataframe=pd.read_csv(sweep.table("csv")))})
        for f in files:
            run.save(str(f), base_path=str(root), policy="now")
        where = run.dir
    finally:
        run.finish()
    return where


def _push_mlflow(root: Path, sweep: SweepDir, files: list[Path]) -> str:
    client = mlflow_client(root)
    run = mlflow_run(client, root.name, "table", {"hpc_kd.sweep_dir": str(root)})
    for f in files:
        client.log_artifact(run.info.run_id, str(f))
    if sweep.plots.is_dir():
        client.log_artifacts(run.info.run_id, str(sweep.plots), "plots")
    client.set_terminated(run.info.run_id, "FINISHED")
    return f"run {run.info.run_id} (experiment {root.name})"


def _push_tensorboard(root: Path, sweep: SweepDir, files: list[Path]) -> str:
    from torch.utils.tensorboard import SummaryWriter

    folder = tensorboard_folder(root) / "table"
    with SummaryWriter(str(folder)) as writer:
        for f in files:
            if f.suffix == ".md":
                writer.add_text(f.stem, f.read_text(), 0)
    return str(folder)


PUSH = {"wandb": _push_wandb, "mlflow": _push_mlflow, "tensorboard": _push_tensorboard}
