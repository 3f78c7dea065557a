"""Training under DeepSpeed: :mod:`hpc_kd.loop`'s trainee and trainer on one or many ranks.

How the ranks share one optimiser step, so that 2 ranks give what 1 rank gives on the same
``train.batch_size`` (the global batch):

- The batches are the one-process batches. Rank ``r`` takes the ``r``-th contiguous slice of each
  (``np.array_split``), cut again into ``gradient_accumulation`` micro-batches. A rank whose
  micro-batch is empty (a batch smaller than ranks x micro-batches) runs the batch's first
  example with weight 0, so that every rank takes part in every collective.
- A micro-batch's loss is the *sum* of its examples' losses x ranks x micro-batches / batch
  size. DeepSpeed averages gradients over ranks and divides by the accumulation steps, so the
  step's gradient is exactly the mean over the batch, however the batch was cut.
- TEID: the selection policy sees the whole batch. Per-example losses, logits and labels are
  gathered from every rank; every rank runs the policy on them (so a stateful policy stays in
  step everywhere) and rank 0's weights are broadcast, so that no rounding difference can ever
  split the ranks. Any policy decides exactly as it does in one process; selection counts are
  kept identically on every rank and written once, by rank 0. An online tutor is a second
  engine; its KD step toward the teacher is normalised by the teacher weight of the whole batch.
- Validation: each rank predicts every ``ranks``-th length-sorted batch; predictions are gathered
  and every rank computes the metrics from all of them (the one-process numbers). Under ZeRO-3
  a forward pass is collective, so ranks then run equally many batches (repeating one).
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

from . import distributed, losses
from .config import ConfigError, DeepSpeedConfig, TrainConfig
from .data import eval_batches
from .loop import Progress, Trainer, forward, linear_schedule, param_groups
from .metrics import classification_metrics
from .models import save_model
from .policies import Selection


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
        schedule = linear_schedule(cfg, total_steps)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr),
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
            config=ds_config(cfg, ds, world_size))
        self.cfg, self.ds, self.module = cfg, ds, model
        self.model = self.engine  # forward passes go through the engine (ZeRO-3 hooks, precision)

    def step(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        self.engine.step()

    def save(self, folder, tag: str) -> None:
        self.engine.save_checkpoint(str(folder), tag=tag, save_latest=False)

    def load(self, folder, tag: str) -> None:
        path, _ = self.engine.load_checkpoint(str(folder), tag=tag)
        if path is None:
            raise FileNotFoundError(f"DeepSpeed checkpoint {folder}/{tag} is missing")


def partitioned(model) -> bool:
    """True when ZeRO-3 holds the parameters in pieces (a forward pass is then collective)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


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
        if task.tutor is not None and task.tutor.trainable:
            # its forward passes go through its engine too (ZeRO-3 keeps its bookkeeping there)
            task.tutor.model = task.tutor.trainee.engine
            task.tutor.model.eval()  # as in one process: the online tutor has no dropout
        torch.manual_seed(rank_seed(seed, self.world.rank))

    def _trainee(self, model, cfg: TrainConfig):
        # every engine of the run steps on the same micro-batches: the student's accumulation
        ds = replace(cfg.deepspeed or DeepSpeedConfig(), gradient_accumulation=self.ds.gradient_accumulation)
        return EngineTrainee(model, cfg, self.total_steps, ds, self.world.size)

    # -- one step, shared by the ranks ---------------------------------------------------------
    def _micro_batches(self, index: np.ndarray):
        """This rank's micro-batches of the batch ``index``: (batch, weight mask, real rows, first row)."""
        world, k = self.world, self.ds.gradient_accumulation
        slices = np.array_split(index, world.size)
        start = sum(len(s) for s in slices[: world.rank])
        out = []
        for part in np.array_split(slices[world.rank], k):
            rows = part if len(part) else index[:1]
            batch = {key: v.to(self.device) for key, v in self.data.encoded["train"].collate(rows).items()}
            mask = torch.full((len(rows),), 1.0 if len(part) else 0.0, device=self.device)
            out.append((batch, mask, len(part), start))
            start += len(part)
        return out

    def _train_step(self, index: np.ndarray) -> dict:
        task, n = self.task, len(index)
        micro = self._micro_batches(index)
        scale = self.world.size * len(micro) / n
        record = {"step": self.p.step}
        if task.tutor is not None:
            loss_sum = self._teid(micro, scale, record)
        else:
            loss_sum = 0.0
            for batch, mask, _, _ in micro:
                z_s = forward(self.student.model, batch).float()
                if task.teacher is None:  # fine-tuning
                    per_example = losses.cross_entropy(z_s, batch["labels"])
                else:  # classic KD
                    z_t = task.teacher.logits(batch).float()
                    per_example = losses.distillation_loss(z_s, z_t, batch["labels"], task.tau, task.alpha, task.term)
                self.student.step((mask * per_example).sum() * scale)
                loss_sum += float((mask * per_example).detach().sum())
            if task.teacher is not None:
                self._count(torch.ones(n))
                record["teacher_weight"] = 1.0
        if self.probe is not None:
            now = self._probe_loss()
            task.policy.feedback(self.p.probe_loss - now)
            self.p.probe_loss = now
        record["loss"] = float(distributed.all_sum([loss_sum])[0]) / n
        return record

    def _teid(self, micro, scale: float, record: dict) -> float:
        """TEID on this rank's micro-batches. With one micro-batch: forward, select, backward.
        With several, the policy must see all of them before any backward, so a first pass
        without gradients computes what it sees and a second pass, replaying the same dropout
        masks, does forward + backward per micro-batch: ZeRO-3 needs forward/backward pairs, and
        activations stay those of one micro-batch (what accumulation is for)."""
        task, two_pass = self.task, len(micro) > 1
        rng = torch.get_rng_state() if two_pass else None
        outs = []
        for batch, mask, real, start in micro:
            with torch.no_grad() if two_pass else nullcontext():
                z_s = forward(self.student.model, batch).float()
                z_u = task.tutor.logits(batch)  # keeps its graph for a live online tutor's update
            o = {"batch": batch, "mask": mask, "real": real, "start": start, "z_s": z_s, "z_u": z_u,
                 "z_t": task.teacher.logits(batch).float()}
            outs.append(self._losses(o))
        w_all = self._select(outs)
        total_w = float(w_all.sum())
        update_tutor = task.tutor.trainable and total_w > 0  # the same on every rank: w_all is
        if two_pass:
            torch.set_rng_state(rng)
        loss_sum = 0.0
        for o in outs:
            y, mask = o["batch"]["labels"], o["mask"]
            if two_pass:
                o = self._losses({**o, "z_s": forward(self.student.model, o["batch"]).float()})
            w = w_all[o["start"]: o["start"] + o["real"]] if o["real"] else torch.zeros(1)
            w = w.to(self.device, o["l_t"].dtype)
            if task.policy.mixes_targets:
                z_mix = losses.mix_targets(o["z_t"], o["z_u"].detach().float(), w, task.tau, task.term)
                per_example = losses.distillation_loss(o["z_s"], z_mix, y, task.tau, task.alpha, task.term)
            else:
                per_example = w * o["l_t"] + (1 - w) * o["l_u"]
            if update_tutor:  # "update tutor U from teacher T", on the examples the teacher won
                if task.tutor.live:
                    z_live = task.tutor.logits(o["batch"]) if two_pass else o["z_u"]
                else:
                    z_live = task.tutor.live_logits(o["batch"])
                l_ut = losses.distillation_loss(z_live.float(), o["z_t"], y, task.tau, task.alpha, task.term)
                task.tutor.update((mask * w * l_ut).sum() * self.world.size * len(micro) / total_w)
            self.student.step((mask * per_example).sum() * scale)
            loss_sum += float((mask * per_example).detach().sum())
        self._count(w_all)
        record["tutor_updated"] = update_tutor
        record["teacher_weight"] = float(w_all.mean())
        return loss_sum

    def _losses(self, o: dict) -> dict:
        t = self.task
        y = o["batch"]["labels"]
        o["l_t"] = losses.distillation_loss(o["z_s"], o["z_t"], y, t.tau, t.alpha, t.term)
        o["l_u"] = losses.distillation_loss(o["z_s"], o["z_u"].detach().float(), y, t.tau, t.alpha, t.term)
        return o

    def _select(self, outs) -> torch.Tensor:
        """The policy's weights for the whole batch (one per example, in batch order)."""
        def rows(o):
            r = o["real"]
            cols = [o["l_t"][:r, None], o["l_u"][:r, None], o["z_s"][:r], o["z_t"][:r], o["z_u"][:r].float(),
                    o["batch"]["labels"][:r, None].to(torch.float32)]
            return torch.cat([c.detach().to(torch.float64) for c in cols], dim=1)

        table = distributed.gather_rows(torch.cat([rows(o) for o in outs]))
        c = outs[0]["z_s"].shape[1]
        f32 = table.to(torch.float32)  # exact: every value was a float32 (or a small integer)
        sel = Selection(f32[:, 0], f32[:, 1], f32[:, 2:2 + c], f32[:, 2 + c:2 + 2 * c], f32[:, 2 + 2 * c:2 + 3 * c],
                        table[:, -1].to(torch.int64), self.p.step, self.total_steps)
        w = self.task.policy.select(sel).to(torch.float32).cpu()
        return distributed.broadcast(w)

    # -- evaluation and export -----------------------------------------------------------------
    def _evaluate(self, model, split: str, per_example: bool = False) -> dict:
        data, world = self.data.encoded[split], self.world
        batches = eval_batches(data.lengths, self.cfg.eval_batch_size)
        mine = batches[world.rank::world.size]
        if partitioned(model):  # collective forward passes: every rank runs as many
            rounds = math.ceil(len(batches) / world.size)
            mine = mine + [batches[0]] * (rounds - len(mine))
        was_training = model.training
        model.eval()
        found = []
        with torch.no_grad():
            for i, index in enumerate(mine):
                batch = {k: v.to(self.device) for k, v in data.collate(index).items()}
                pred = forward(model, batch).argmax(-1).cpu()
                if i * world.size + world.rank < len(batches):  # not a repeat
                    found.append(torch.stack([torch.as_tensor(index), pred], dim=1))
        model.train(was_training)
        local = torch.cat(found) if found else torch.zeros((0, 2), dtype=torch.int64)
        table = distributed.gather_rows(local)
        preds = np.zeros(len(data), dtype=np.int64)
        preds[table[:, 0].numpy()] = table[:, 1].numpy()
        metrics = classification_metrics(data.labels, preds, self.data.num_labels)
        if per_example:
            metrics["correct"] = (preds == data.labels).astype(int).tolist()
        return metrics

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
        folder = self.run.path / "deepspeed"
        self.student.save(folder / "student", self._tag())
        if self.task.tutor is not None and self.task.tutor.trainable:
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
        folder, tag = self.run.path / "deepspeed", state["deepspeed"]
        self.student.load(folder / "student", tag)
        if self.task.tutor is not None and self.task.tutor.trainable:
            self.task.tutor.trainee.load(folder / "tutor", tag)
            self.task.tutor.model.eval()
        self.p = Progress(**state["progress"])
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
            for engine in (self.run.path / "deepspeed").iterdir():
                for old in engine.iterdir():
                    if old.is_dir() and old.name != state["deepspeed"]:
                        shutil.rmtree(old, ignore_errors=True)
        distributed.barrier()

    def _final(self, seconds: float) -> dict:
        result = super()._final(seconds)
        result["execution"] = {"ranks": self.world.size, "deepspeed": asdict(self.ds)}
        return result
