"""Many processes, one stage: which rank this process is, the process group, the few
collectives the training loop needs, and the rule that only rank 0 writes a run's files.

A process learns its rank from, in this order:

- ``torchrun`` (``python -m torch.distributed.run``): ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``;
- SLURM (a submitit job with several tasks, or ``srun``): ``SLURM_PROCID``, ``SLURM_NTASKS``,
  ``SLURM_LOCALID``, ``SLURM_JOB_NUM_NODES``; the master is the first host of
  ``SLURM_JOB_NODELIST``, the port is derived from ``SLURM_JOB_ID``;
- submitit's local executor: ``SUBMITIT_LOCAL_GLOBALID`` / ``NTASKS`` / ``LOCALID`` / ``JOB_ID``;
- otherwise it is alone (one rank).

The master port is ``PORT_BASE + job_id % PORT_SPAN``: jobs whose ranks meet on the same master
node get different ports unless their ids differ by a multiple of 12,000, and every port is
below Linux's ephemeral range (32768+), where outgoing connections take theirs. An explicit
``MASTER_PORT`` wins.

:func:`run_plan` runs a plan's stages in order on every rank; ``python -m hpc_kd.launch run
SWEEP.yaml [key=value ...] [--stage KEY ...]`` (or ``hpc-kd run``) is its command line.
"""
from __future__ import annotations

import datetime
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Mapping

import torch

from .rundir import RunDir

PORT_BASE, PORT_SPAN = 20000, 12000
#: minutes a rank waits for the others in a collective before giving up (HPC_KD_DIST_TIMEOUT_MIN)
DEFAULT_TIMEOUT_MIN = 30


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of a job."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    #: where the ranks came from: torchrun | slurm | submitit-local | single
    launcher: str = "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def env(self) -> dict[str, str]:
        """The variables of torch's ``env://`` initialisation (DeepSpeed also needs LOCAL_RANK)."""
        return {"MASTER_ADDR": self.master_addr, "MASTER_PORT": str(self.master_port), "RANK": str(self.rank),
                "WORLD_SIZE": str(self.size), "LOCAL_RANK": str(self.local_rank),
                "LOCAL_WORLD_SIZE": str(self.local_size)}


def master_port(job_id: str | int | None) -> int:
    """A port for the job's rendezvous, derived from its id (see the module docstring)."""
    digits = re.sub(r"\D", "", str(job_id or ""))
    return PORT_BASE + int(digits or 0) % PORT_SPAN


def parse_nodelist(text: str) -> list[str]:
    """SLURM's compressed host list -> host names: ``gpu[017-018,020],cpu1`` ->
    ``["gpu017", "gpu018", "gpu020", "cpu1"]`` (zero padding kept)."""
    hosts, depth, start = [], 0, 0
    parts = []
    for i, ch in enumerate(text + ","):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    for part in filter(None, parts):
        match = re.fullmatch(r"([^\[]*)\[([^\]]+)\](.*)", part)
        if not match:
            hosts.append(part)
            continue
        prefix, ranges, suffix = match.groups()
        for item in ranges.split(","):
            low, _, high = item.partition("-")
            for n in range(int(low), int(high or low) + 1):
                hosts.append(f"{prefix}{n:0{len(low)}d}{suffix}")
    return hosts


def detect(environ: Mapping[str, str] | None = None) -> World:
    """This process's :class:`World`, from the launcher's environment (a pure function of it)."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        size = int(env["WORLD_SIZE"])
        return World(int(env["RANK"]), size, int(env.get("LOCAL_RANK", 0)), int(env.get("LOCAL_WORLD_SIZE", size)),
                     env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)), "torchrun")
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        size = int(env["SLURM_NTASKS"])
        nodes = int(env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", "1")))
        hosts = parse_nodelist(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "127.0.0.1")))
        port = int(env["MASTER_PORT"]) if "MASTER_PORT" in env else master_port(env.get("SLURM_JOB_ID"))
        return World(int(env["SLURM_PROCID"]), size, int(env.get("SLURM_LOCALID", 0)), size // max(1, nodes),
                     hosts[0], port, "slurm")
    if int(env.get("SUBMITIT_LOCAL_NTASKS", "1")) > 1:
        size = int(env["SUBMITIT_LOCAL_NTASKS"])
        port = int(env["MASTER_PORT"]) if "MASTER_PORT" in env else master_port(env.get("SUBMITIT_LOCAL_JOB_ID"))
        return World(int(env["SUBMITIT_LOCAL_GLOBALID"]), size, int(env.get("SUBMITIT_LOCAL_LOCALID", 0)), size,
                     "127.0.0.1", port, "submitit-local")
    return World()


def device_for(world: World, wanted: str = "auto", cuda_devices: int | None = None) -> str:
    """The device a rank trains on: ``cuda:<local rank>`` (modulo the GPUs it sees, so one GPU
    per task bound by SLURM is ``cuda:0``) or ``cpu``. One rank keeps plain ``cuda`` / ``cpu``."""
    count = torch.cuda.device_count() if cuda_devices is None else cuda_devices
    use_cuda = (wanted == "cuda") or (wanted == "auto" and count > 0)
    if not use_cuda:
        return "cpu"
    if world.size == 1:
        return "cuda"
    return f"cuda:{world.local_rank % max(1, count)}"


def torchrun_command(nodes: int, procs_per_node: int, master_addr: str, port: int, job_id: str,
                     sweep: str, python: str = "python") -> list[str]:
    """Start a sweep by hand on ``nodes`` x ``procs_per_node`` ranks from inside an allocation
    (``salloc``/``sbatch``): one ``torchrun`` per node, which meet at ``master_addr:port``."""
    return ["srun", f"--nodes={nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
            python, "-m", "torch.distributed.run", f"--nnodes={nodes}", f"--nproc-per-node={procs_per_node}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint={master_addr}:{port}", f"--rdzv-id={job_id}",
            "-m", "hpc_kd.launch", "run", sweep]


# -- the process group ----------------------------------------------------------------------


def _dist():
    import torch.distributed as dist

    return dist


def active() -> bool:
    dist = _dist()
    return dist.is_available() and dist.is_initialized()


def current() -> World:
    """The world of the initialised process group (one rank when there is none)."""
    if not active():
        return World()
    dist, world = _dist(), detect()
    return world if world.size == dist.get_world_size() else World(dist.get_rank(), dist.get_world_size())


def init(world: World, device: str = "cpu") -> None:
    """Join the process group of ``world`` (gloo on CPU, NCCL on GPUs) and let DeepSpeed adopt it.
    One rank gets a private in-memory group: no port, so any number of such jobs share a machine."""
    if active():
        return
    dist = _dist()
    timeout = datetime.timedelta(minutes=float(os.environ.get("HPC_KD_DIST_TIMEOUT_MIN", DEFAULT_TIMEOUT_MIN)))
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if device.startswith("cuda:"):
        torch.cuda.set_device(torch.device(device))
    if world.size == 1:
        os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed insists on it
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    else:
        os.environ.update(world.env())
        dist.init_process_group(backend, init_method="env://", rank=world.rank, world_size=world.size, timeout=timeout)
    quiet_deepspeed()
    import deepspeed

    deepspeed.init_distributed(backend)


def shutdown() -> None:
    if active():
        _dist().destroy_process_group()


@contextmanager
def session(world: World, device: str = "cpu"):
    """The process group for the duration of a job: joined on entry, left on exit."""
    init(world, device)
    try:
        yield world
    finally:
        shutdown()


def quiet_deepspeed() -> None:
    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    try:
        from deepspeed.utils import logger

        logger.setLevel(logging.WARNING)
    except ImportError:
        pass


# -- collectives: all of them no-ops for one rank ---------------------------------------------


def barrier() -> None:
    if active() and _dist().get_world_size() > 1:
        _dist().barrier()


def all_sum(values) -> torch.Tensor:
    """Element-wise sum over ranks of a float64 vector (on CPU; NCCL needs it on the GPU)."""
    t = torch.as_tensor(values, dtype=torch.float64).reshape(-1).clone()
    if active() and _dist().get_world_size() > 1:
        on = _collective_device()
        t = t.to(on)
        _dist().all_reduce(t)
        t = t.cpu()
    return t


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Every rank's rows, concatenated in rank order (ranks may hold different numbers of rows)."""
    if not active() or _dist().get_world_size() == 1:
        return t
    dist, on = _dist(), _collective_device()
    sizes = [None] * dist.get_world_size()
    dist.all_gather_object(sizes, int(t.shape[0]))
    width = max(sizes)
    padded = torch.zeros((width, *t.shape[1:]), dtype=t.dtype, device=on)
    padded[: t.shape[0]] = t.detach().to(on)
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return torch.cat([o[:n] for o, n in zip(out, sizes)]).to(t.device)


def broadcast(obj):
    """Rank 0's ``obj`` on every rank (decisions that must agree, e.g. "is this stage done?")."""
    if not active() or _dist().get_world_size() == 1:
        return obj
    box = [obj]
    _dist().broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj) -> list:
    if not active() or _dist().get_world_size() == 1:
        return [obj]
    out = [None] * _dist().get_world_size()
    _dist().all_gather_object(out, obj)
    return out


def partitioned(model) -> bool:
    """True when ZeRO-3 holds the parameters in pieces (a forward pass is then collective)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def _collective_device() -> torch.device:
    if _dist().get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# -- rank-0 I/O -------------------------------------------------------------------------------


class FollowerRunDir(RunDir):
    """A run folder as ranks other than 0 see it: they read it, only rank 0 writes it."""

    def start(self, config: dict) -> None:
        pass

    def finish(self, result: dict) -> None:
        pass

    def append_metrics(self, record: dict) -> None:
        pass

    def truncate_metrics(self, count: int) -> None:
        pass

    def set_aside_damaged(self) -> list:
        return []

    def save_checkpoint(self, state: dict) -> None:
        pass

    @contextmanager
    def owned(self, wait: bool = False, log=None):
        yield self  # rank 0 owns the folder for the job


def for_this_rank(run: RunDir) -> RunDir:
    world = current()
    return run if world.is_main else FollowerRunDir(run.path)


def finish_run(run: RunDir) -> None:
    """After rank 0 wrote ``result.json``: drop the DeepSpeed checkpoints, let every rank go on."""
    import shutil

    barrier()
    if current().is_main:
        shutil.rmtree(run.deepspeed, ignore_errors=True)
    barrier()


# -- running stages on every rank ------------------------------------------------------------


def run_stage(stage, root, run_cfg, on_step=None):
    """Run ``stage`` as one rank of the job this process belongs to: joins the process group
    for the stage's duration. ``Stage.__call__`` does this by itself when it finds several
    tasks and no group (so a submitit job just calls the stage on every task)."""
    world = detect()
    if world.size == 1:
        return stage(root, run_cfg, on_step=on_step)
    with session(world, device_for(world, run_cfg.device)):
        return stage(root, run_cfg, on_step=on_step)


def run_plan(plan, keys=None, on_step=None, log=print) -> dict:
    """Every stage of ``plan`` (or those in ``keys``), in order, on every rank of the group.
    ``plan``: anything with ``stages`` (key -> stage, in topological order), ``root`` and ``run``
    (:class:`hpc_kd.plan.Plan`, which this module does not import)."""
    results, main = {}, current().is_main
    for key, stage in plan.stages.items():
        if keys is not None and key not in keys:
            continue
        if main:
            log(f"[run] {key} ({stage.role}) on {current().size} rank(s)")
        results[key] = stage(plan.root, plan.run, on_step=on_step)
    return results
