"""Training under DeepSpeed: :mod:`hpc_kd.loop`'s trainee and trainer on one or many ranks.

What is distributed lives here; what a step computes does not: the step is
:func:`hpc_kd.step.train_step` and evaluation :func:`hpc_kd.loop.evaluate`, the same functions the
one-process loop runs, with collectives that are no-ops for one rank. This module adds:

- the cutting of a batch: ``train.batch_size`` stays the global batch; rank ``r`` takes the
  ``r``-th contiguous slice of each one-process batch (``np.array_split``), cut again into
  ``gradient_accumulation`` micro-batches (:meth:`EngineTrainer._micro_batches`). A rank whose
  micro-batch is empty (a batch smaller than ranks x micro-batches) runs the batch's first
  example with weight 0, so that every rank takes part in every collective;
- the engines: DeepSpeed averages gradients over ranks and divides by the accumulation steps; an
  online tutor is a second engine stepping on the same micro-batches;
- Only rank 0 writes the run's files (:class:`hpc_kd.distributed.FollowerRunDir`).
- Checkpoint: models, optimisers and schedules through ``engine.save_checkpoint`` under
  ``<run>/deepspeed/{student,tutor}/<tag>``; the loop's one dict (progress, every rank's RNG
  state, policy state) in ``checkpoint.pt``, written by rank 0 once every rank has saved, naming
  the tag. Resume needs the same number of ranks.
- Export: parameters gathered (ZeRO-3), an fp32 copy saved in Hugging Face format by rank 0.
"""
from __future__ import annotations

import math
import shutil
from contextlib import nullcontext
from dataclasses import asdict, replace

import numpy as np
import torch

from . import distributed
from .config import ConfigError, DeepSpeedConfig, TrainConfig
from .distributed import partitioned
from .loop import Progress, Trainer, adamw, linear_schedule, set_rate
from .models import save_model
from .step import Micro


def ds_config(cfg: TrainConfig, ds: DeepSpeedConfig, world_size: int) -> dict:
    """The DeepSpeed config of one engine. Batches are cut by the trainer, not by DeepSpeed:
    the batch sizes here only have to be consistent; accumulation and clipping are what count."""
    micro = max(1, math.ceil(cfg.batch_size / (world_size * ds.gradient_accumulation)))
    zero: dict = {"stage": ds.zero_stage}
    if ds.zero_stage == 3:
        # else ZeRO-3 replaces torch.nn.functional.linear for the whole process, for good: every
        # later stage in the process would compute (slightly) different numbers
        zero["memory_efficient_linear"] = False
    if ds.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": ds.offload_optimizer, "pin_memory": torch.cuda.is_available()}
    return {
        "train_batch_size": micro * ds.gradient_accumulation * world_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": ds.gradient_accumulation,
        "gradient_clipping": cfg.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16"},
        # the optimiser is the loop's torch AdamW (same maths on any rank count), also when offloaded
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def _check_precision(ds: DeepSpeedConfig) -> None:
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    supported = {"fp32": True, "bf16": acc.is_bf16_supported(), "fp16": acc.is_fp16_supported()}
    if not supported[ds.precision]:
        raise ConfigError("deepspeed.precision", f"{ds.precision} is not supported on this machine's {acc.device_name()}")


class EngineTrainee:
    """A model trained by a DeepSpeed engine: the loop's AdamW and linear schedule, DeepSpeed's
    gradient averaging, clipping, ZeRO partitioning and mixed precision. ``step(loss)`` is one
    micro-batch (the engine steps the optimiser at accumulation boundaries)."""

    def __init__(self, model, cfg: TrainConfig, total_steps: int, ds: DeepSpeedConfig, world_size: int):
        import deepspeed

        distributed.quiet_deepspeed()
        _check_precision(ds)
        self.schedule = schedule = linear_schedule(cfg, total_steps)
        self.last_rate: float | None = None
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=adamw(model, cfg),
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
            config=ds_config(cfg, ds, world_size))
        self.cfg, self.ds, self.module = cfg, ds, model
        self.model = self.engine  # forward passes go through the engine (ZeRO-3 hooks, precision)

    def step(self, loss: torch.Tensor, at: int | None = None, share: float = 1.0) -> None:
        """One micro-batch (see :meth:`hpc_kd.loop.Trainee.step` for ``at`` and ``share``)."""
        self.engine.backward(loss)
        if at is not None:  # before the engine's step: it steps the optimiser at the boundary
            set_rate(self.scheduler, self.schedule(at) * share)
            self.last_rate = self.scheduler.optimizer.param_groups[0]["lr"]
        self.engine.step()

    def save(self, folder, tag: str) -> None:
        self.engine.save_checkpoint(str(folder), tag=tag, save_latest=False)

    def load(self, folder, tag: str) -> None:
        path, _ = self.engine.load_checkpoint(str(folder), tag=tag)
        if path is None:
            raise FileNotFoundError(f"DeepSpeed checkpoint {folder}/{tag} is missing")


def gathered(model):
    """Full parameters for the ``with`` block (ZeRO-3), on every rank; a no-op otherwise."""
    if not partitioned(model):
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)


def plain_copy(model):
    """An fp32 copy of ``model`` outside any engine, its parameters gathered (collective under ZeRO-3)."""
    module = getattr(model, "module", model)
    with gathered(module):
        state = {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().clone()
                 for k, v in module.state_dict().items()}
    with torch.random.fork_rng(devices=[]):  # building a model draws random weights: keep the run's RNG
        copy = type(module)(module.config)
    copy.load_state_dict(state)
    return copy.eval()


def rank_seed(seed: int, rank: int) -> int:
    """Rank 0 keeps the run's seed (one rank = the one-process run); others get their own stream
    (dropout masks must differ between ranks)."""
    return seed if rank == 0 else int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


class EngineTrainer(Trainer):
    """:class:`hpc_kd.loop.Trainer` on the ranks of the current process group (see module doc)."""

    def __init__(self, run, student, tokenizer, dataset, task, cfg: TrainConfig, seed: int, **options):
        self.world = distributed.current()
        self.ds = cfg.deepspeed or DeepSpeedConfig()
        super().__init__(run, student, tokenizer, dataset, task, cfg, seed, **options)
        if task.tutor_learns:
            # its forward passes go through its engine too (ZeRO-3 keeps its bookkeeping there)
            task.tutor.model = task.tutor.trainee.engine
            task.tutor.model.eval()  # as in one process: the online tutor has no dropout
        torch.manual_seed(rank_seed(seed, self.world.rank))

    def _trainee(self, model, cfg: TrainConfig):
        # every engine of the run steps on the same micro-batches: the student's accumulation
        ds = replace(cfg.deepspeed or DeepSpeedConfig(), gradient_accumulation=self.ds.gradient_accumulation)
        return EngineTrainee(model, cfg, self.total_steps, ds, self.world.size)

    # -- the ranks' part of a batch (the step itself is hpc_kd.step.train_step) ---------------
    def _micro_batches(self, index: np.ndarray) -> list[Micro]:
        """This rank's micro-batches of the batch ``index``: the rank's contiguous slice, cut
        into ``gradient_accumulation`` pieces; an empty piece runs the batch's first row, masked."""
        world, k = self.world, self.ds.gradient_accumulation
        slices = np.array_split(index, world.size)
        start = sum(len(s) for s in slices[: world.rank])
        out = []
        for part in np.array_split(slices[world.rank], k):
            rows = part if len(part) else index[:1]
            batch = {key: v.to(self.device) for key, v in self.data.encoded["train"].collate(rows).items()}
            mask = torch.full((len(rows),), 1.0 if len(part) else 0.0, device=self.device)
            out.append(Micro(batch, mask, start, len(part)))
            start += len(part)
        return out

    # -- export --------------------------------------------------------------------------------
    def _save(self, model, path) -> None:
        module = getattr(model, "module", model)
        if partitioned(module) or next(module.parameters()).dtype != torch.float32:
            copy = plain_copy(module)  # every rank takes part in the gather
            if self.world.is_main:
                save_model(copy, self.tokenizer, path)
        elif self.world.is_main:
            save_model(module, self.tokenizer, path)
        distributed.barrier()

    # -- checkpoint: DeepSpeed's files + the loop's dict ---------------------------------------
    def _tag(self) -> str:
        return f"step-{self.p.step:08d}"

    def state_dict(self) -> dict:
        """Writes the engines' checkpoints (every rank), then returns the loop's dict naming them."""
        folder = self.run.deepspeed
        self.student.save(folder / "student", self._tag())
        if self.task.tutor_learns:
            self.task.tutor.trainee.save(folder / "tutor", self._tag())
        state = {"deepspeed": self._tag(), "world_size": self.world.size, "progress": dict(vars(self.p)),
                 "rng": distributed.all_gather_object(torch.get_rng_state())}
        if torch.cuda.is_available():
            state["cuda_rng"] = distributed.all_gather_object(torch.cuda.get_rng_state())
        if self.task.policy is not None:
            state["policy"] = self.task.policy.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        if "deepspeed" not in state:
            raise RuntimeError(f"{self.run.checkpoint} was written by a one-process run; delete it to restart under DeepSpeed")
        if state["world_size"] != self.world.size:
            raise RuntimeError(f"{self.run.checkpoint} was written by {state['world_size']} ranks, this job has "
                               f"{self.world.size}: resume with as many ranks (or delete it to restart)")
        folder, tag = self.run.deepspeed, state["deepspeed"]
        self.student.load(folder / "student", tag)
        if self.task.tutor_learns:
            self.task.tutor.trainee.load(folder / "tutor", tag)
            self.task.tutor.model.eval()
        self.p = Progress.restore(state["progress"])
        torch.set_rng_state(state["rng"][self.world.rank])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda_rng"][self.world.rank])
        if "policy" in state:
            self.task.policy.load_state_dict(state["policy"])

    def _checkpoint(self) -> None:
        state = self.state_dict()
        distributed.barrier()  # every rank has saved its part: now the dict may name the tag
        self.run.save_checkpoint(state)  # rank 0 only
        if self.world.is_main:
            for engine in (self.run.deepspeed).iterdir():
                for old in engine.iterdir():
                    if old.is_dir() and old.name != state["deepspeed"]:
                        shutil.rmtree(old, ignore_errors=True)
        distributed.barrier()

    def _final(self, seconds: float) -> dict:
        result = super()._final(seconds)
        result["execution"] = {"ranks": self.world.size, "deepspeed": asdict(self.ds)}
        return result
