"""What a stage job asks the cluster for, in user terms, and its one translation to submitit.

A cluster profile (``slurm/profiles/<name>.yaml``) holds ``default:`` resources and optional
per-stage-kind overrides under ``kinds:``::

    default: {partition: gpu, gpus_per_node: 1, cpus_per_task: 8, time_min: 240}
    kinds:
      finetune: {time_min: 600}
      cache: {time_min: 60}

It is validated when loaded (unknown key, wrong type, unknown stage kind: a :class:`ConfigError`
naming the key), so a bad profile fails before anything is submitted. Resources are operational:
they never enter a stage's signature.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from .config import ConfigError, from_dict, read_yaml


#: the local executor's time limit: a week, i.e. none
LOCAL_TIMEOUT_MIN = 7 * 24 * 60


@dataclass(frozen=True)
class Resources:
    """One stage job's request. ``None`` leaves the cluster's default in place."""

    #: SLURM partition, account and quality of service.
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    #: nodes, and tasks (processes) per node: each task is one rank of the stage (hpc_kd.distributed).
    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0
    #: CPUs per task; also the stage's torch thread count unless ``run.threads`` is set.
    cpus_per_task: int = 1
    #: memory per node in GB.
    mem_gb: float | None = None
    #: time limit in minutes. Keep it >= 20: below ~10 minutes submitit takes a preemption
    #: signal for a time-out (the job still resumes, but counts against its time-out budget).
    time_min: int = 60
    #: node features (SLURM --constraint), e.g. "a100|h100".
    constraint: str | None = None
    #: shell lines run before the job starts (module load, activate an environment, ...).
    setup: tuple[str, ...] = ()

    def __post_init__(self):
        for key in ("nodes", "tasks_per_node", "cpus_per_task", "time_min"):
            if getattr(self, key) < 1:
                raise ConfigError(key, f"must be >= 1, got {getattr(self, key)}")
        if self.gpus_per_node < 0:
            raise ConfigError("gpus_per_node", f"must be >= 0, got {self.gpus_per_node}")
        if self.mem_gb is not None and not self.mem_gb > 0:
            raise ConfigError("mem_gb", f"must be > 0, got {self.mem_gb}")


@dataclass(frozen=True)
class Profile:
    """Resources for every stage kind: ``default`` unless ``kinds`` overrides some fields."""

    name: str = "default"
    default: Resources = field(default_factory=Resources)
    kinds: dict = field(default_factory=dict)  # stage kind -> Resources (already merged with default)

    def for_kind(self, kind: str) -> Resources:
        return self.kinds.get(kind, self.default)


def stage_kinds() -> list[str]:
    """Every stage kind the planner knows (subclasses of :class:`hpc_kd.stages.Stage`)."""
    from . import plan  # noqa: F401  (imports every stage kind the plan can contain)
    from .stages import Stage

    kinds, todo = [], list(Stage.__subclasses__())
    while todo:
        cls = todo.pop(0)
        todo += cls.__subclasses__()
        if cls.__dict__.get("kind") and cls.kind not in kinds:
            kinds.append(cls.kind)
    return kinds


def load_profile(path: str | Path | None) -> Profile:
    """Read and validate a profile file; ``None`` gives the built-in default (1 CPU, 60 min)."""
    if path is None:
        return Profile()
    data = read_yaml(path)
    allowed = ("default", "kinds")
    for key in data:
        if key not in allowed:
            raise ConfigError(str(key), f"unknown key; allowed: {', '.join(allowed)}")
    base = data.get("default") or {}
    default = from_dict(Resources, base, "default")
    overrides = data.get("kinds") or {}
    if not isinstance(overrides, dict):
        raise ConfigError("kinds", "must map stage kinds to resources")
    known, kinds = stage_kinds(), {}
    for kind, values in overrides.items():
        if kind not in known:
            raise ConfigError(f"kinds.{kind}", f"unknown stage kind; allowed: {', '.join(known)}")
        if values is not None and not isinstance(values, dict):
            raise ConfigError(f"kinds.{kind}", f"expected a mapping, got {type(values).__name__}")
        kinds[kind] = from_dict(Resources, {**base, **(values or {})}, f"kinds.{kind}")
    return Profile(Path(path).stem, default, kinds)


def submitit_parameters(res: Resources, cluster: str = "slurm") -> dict:
    """The one place where resources become submitit parameters.

    ``slurm``: :class:`submitit.SlurmExecutor` parameters (its sbatch names). ``local``:
    :class:`submitit.LocalExecutor` parameters: GPUs, tasks and setup lines apply; CPUs and memory
    are not enforced on this machine, and neither is the time limit (no scheduler would requeue
    a stage stopped by it: it runs until it ends).
    """
    if cluster == "local":
        return {"timeout_min": LOCAL_TIMEOUT_MIN, "gpus_per_node": res.gpus_per_node,
                "tasks_per_node": res.tasks_per_node, "setup": list(res.setup)}
    if cluster != "slurm":
        raise ValueError(f"unknown cluster kind {cluster!r}")
    params = {
        "partition": res.partition, "account": res.account, "qos": res.qos,
        "nodes": res.nodes, "ntasks_per_node": res.tasks_per_node,
        "gpus_per_node": res.gpus_per_node or None, "cpus_per_task": res.cpus_per_task,
        "mem": None if res.mem_gb is None else _mem(res.mem_gb), "time": res.time_min,
        "constraint": res.constraint, "setup": list(res.setup) or None,
        # a rank that dies must end the job, not leave the others waiting in a collective
        "srun_args": ["--kill-on-bad-exit=1"] if res.nodes * res.tasks_per_node > 1 else None,
    }
    return {k: v for k, v in params.items() if v is not None}


def _mem(gb: float) -> str:
    return f"{int(gb)}GB" if gb == int(gb) else f"{int(gb * 1024)}MB"


def describe(res: Resources) -> str:
    """A short human summary, e.g. ``2 nodes x 4 tasks, 4 GPUs/node, 8 CPUs/task, 90 min``."""
    parts = [f"{res.nodes} node{'s' if res.nodes > 1 else ''} x {res.tasks_per_node} task"
             f"{'s' if res.tasks_per_node > 1 else ''}"]
    if res.gpus_per_node:
        parts.append(f"{res.gpus_per_node} GPU{'s' if res.gpus_per_node > 1 else ''}/node")
    parts.append(f"{res.cpus_per_task} CPU{'s' if res.cpus_per_task > 1 else ''}/task")
    if res.mem_gb:
        parts.append(f"{res.mem_gb:g} GB")
    parts.append(f"{res.time_min} min")
    if res.partition:
        parts.append(f"partition {res.partition}")
    return ", ".join(parts)


def as_dict(res: Resources) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(res).items()}
