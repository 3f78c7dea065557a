"""The one training loop. Fine-tuning, classic KD and TEID differ only in their :class:`Task`:
where the targets come from (none, a teacher, a teacher and a tutor) and which loss applies.

All mutable training state is one dict (models, optimisers, schedules, step, RNG, policy and
early-stopping state, selection counts); the checkpoint is exactly that dict, so a run resumed
from it ends bit-identical to an uninterrupted one on the same machine.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from . import losses
from .config import TrainConfig
from .data import Dataset, Encoded, eval_batches, train_batches
from .metrics import classification_metrics
from .models import save_model
from .policies import Policy, Selection
from .rundir import RunDir

MODEL_INPUTS = ("input_ids", "attention_mask")


def param_groups(model, cfg: TrainConfig) -> list[dict]:
    """AdamW parameter groups: weight decay on matrices, none on biases and LayerNorm."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def linear_schedule(cfg: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """The learning-rate factor at each step: linear warm-up, then linear decay to zero."""
    warmup = int(cfg.warmup_ratio * total_steps)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return schedule


class Trainee:
    """A model being trained: AdamW (no decay on biases and LayerNorm), linear warm-up then
    linear decay to zero over ``total_steps``, gradient clipping. (Under DeepSpeed:
    :class:`hpc_kd.engine.EngineTrainee`.)"""

    def __init__(self, model, cfg: TrainConfig, total_steps: int):
        self.model, self.cfg = model, cfg
        self.optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, linear_schedule(cfg, total_steps))

    def step(self, loss: torch.Tensor) -> None:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def forward(model, batch) -> torch.Tensor:
    return model(**{k: batch[k] for k in MODEL_INPUTS}).logits


class FrozenModel:
    """Targets from a model in eval mode, without gradients (the teacher of Algorithms 1 and 2)."""

    trainable = False

    def __init__(self, model):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def logits(self, batch) -> torch.Tensor:
        return forward(self.model, batch)


class CachedLogits:
    """Targets read by example id from a validated logit cache: no model is loaded at all."""

    trainable = False

    def __init__(self, cache, device):
        self.cache, self.device = cache, device

    def logits(self, batch) -> torch.Tensor:
        return self.cache.logits(batch["example_ids"]).to(self.device)


class OnlineTutor:
    """A tutor that keeps learning from the teacher (Algorithm 2, "update tutor U from teacher T").

    As in the paper it is in evaluation mode (no dropout); its logits keep their graph so that,
    when the teacher is selected, the KD step toward the teacher reuses the same forward pass.
    """

    trainable = True
    live = True  # its selection logits come from the current weights

    def __init__(self, model, cfg: TrainConfig):
        self.model, self.cfg, self.trainee = model.eval(), cfg, None

    def start(self, total_steps: int, make: Callable | None = None) -> None:
        """Build the optimiser once the run's length is known (its schedule spans the run);
        ``make(model, cfg)`` builds another kind of trainee (the trainer's own)."""
        self.trainee = make(self.model, self.cfg) if make else Trainee(self.model, self.cfg, total_steps)

    def logits(self, batch) -> torch.Tensor:
        return forward(self.model, batch)

    def update(self, loss: torch.Tensor) -> None:
        self.trainee.step(loss)


class RefreshTutor(OnlineTutor):
    """``tutor_update: refresh``: the tutor still learns from the teacher during the epoch, but the
    student compares against the tutor's logits cached at the start of the epoch; the cache is
    rebuilt at every epoch boundary (``make_cache(epoch)`` returns a LogitCache), so selection
    costs no tutor forward pass and only teacher-selected batches run the tutor."""

    live = False

    def __init__(self, model, cfg: TrainConfig, make_cache, device):
        super().__init__(model, cfg)
        self.make_cache, self.device, self.cache = make_cache, device, None

    def start_epoch(self, epoch: int) -> None:
        self.cache = self.make_cache(epoch)

    def logits(self, batch) -> torch.Tensor:
        return self.cache.logits(batch["example_ids"]).to(self.device)

    def live_logits(self, batch) -> torch.Tensor:
        return forward(self.model, batch)


@dataclass
class Task:
    """What a run learns from. No teacher: fine-tuning with CE. A teacher: classic KD. A teacher
    and a tutor: TEID, with ``policy`` choosing the source per batch (or per example)."""

    teacher: object | None = None
    tutor: object | None = None
    policy: Policy | None = None
    tau: float = 1.0
    alpha: float = 0.5
    term: str = "kl"

    @property
    def kind(self) -> str:
        return "finetune" if self.teacher is None else ("kd" if self.tutor is None else "teid")


@dataclass
class Progress:
    """Counters that live in the checkpoint."""

    epoch: int = 0
    batch: int = 0  # batches done in the current epoch
    step: int = 0
    best_accuracy: float = -1.0
    best_epoch: int = -1
    bad_epochs: int = 0
    stopped: bool = False
    metrics_lines: int = 0
    window: list = field(default_factory=lambda: [0.0, 0, 0.0])  # loss sum, steps, teacher weight sum since last log
    probe_loss: float | None = None  # the student's loss on the held-out probe slice
    selection: dict = field(default_factory=dict)  # this epoch's counts


def _new_selection() -> dict:
    return {"teacher_batches": 0, "tutor_batches": 0, "mixed_batches": 0, "teacher_weight": 0.0, "examples": 0}


def evaluate(model, data: Encoded, batch_size: int, num_labels: int, device, per_example: bool = False) -> dict:
    """Metrics of ``model`` on ``data``; ``per_example`` adds ``correct`` (0/1 per example, in the
    split's order) for paired comparisons between runs."""
    was_training = model.training
    model.eval()
    preds = np.zeros(len(data), dtype=np.int64)
    with torch.no_grad():
        for index in eval_batches(data.lengths, batch_size):
            batch = {k: v.to(device) for k, v in data.collate(index).items()}
            preds[index] = forward(model, batch).argmax(-1).cpu().numpy()
    model.train(was_training)
    metrics = classification_metrics(data.labels, preds, num_labels)
    if per_example:
        metrics["correct"] = (preds == data.labels).astype(int).tolist()
    return metrics


class Trainer:
    """Trains ``student`` on ``dataset`` for ``task``, writing into ``run``.

    ``on_step(trainer, record)`` is called after every optimiser step (tests use it to inspect
    or interrupt a run).
    """

    def __init__(self, run: RunDir, student, tokenizer, dataset: Dataset, task: Task, cfg: TrainConfig,
                 seed: int, *, checkpoint_every: int = 50, log_every: int = 10, progress: bool = False,
                 device: str = "cpu", on_step: Callable | None = None):
        self.run, self.tokenizer, self.data, self.task, self.cfg, self.seed = run, tokenizer, dataset, task, cfg, seed
        self.checkpoint_every, self.log_every, self.progress, self.device, self.on_step = (
            checkpoint_every, log_every, progress, torch.device(device), on_step)
        # A policy that measures the student on held-out training examples gets them kept out.
        n = len(dataset.encoded["train"])
        probe_size = getattr(task.policy, "probe", None) if task.tutor is not None else None
        order = np.random.default_rng(seed).permutation(n)
        self.probe = np.sort(order[:probe_size]) if probe_size else None
        self.train_index = np.sort(order[probe_size:]) if probe_size else np.arange(n)
        self.train_lengths = dataset.encoded["train"].lengths[self.train_index]
        self.batches_per_epoch = len(self._batches(0))
        self.total_steps = cfg.epochs * self.batches_per_epoch
        torch.manual_seed(seed)
        self.student = self._trainee(student.to(self.device).train(), cfg)
        if task.tutor is not None and task.tutor.trainable:
            task.tutor.start(self.total_steps, self._trainee)
        self.p = Progress(selection=_new_selection())

    def _trainee(self, model, cfg: TrainConfig):
        return Trainee(model, cfg, self.total_steps)

    # -- checkpoint: one dict ------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {
            "student": self.student.state_dict(),
            "progress": {k: v for k, v in vars(self.p).items()},
            "rng": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        if self.task.tutor is not None and self.task.tutor.trainable:
            state["tutor"] = self.task.tutor.trainee.state_dict()
        if self.task.policy is not None:
            state["policy"] = self.task.policy.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.student.load_state_dict(state["student"])
        self.p = Progress(**state["progress"])
        torch.set_rng_state(state["rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        if "tutor" in state:
            self.task.tutor.trainee.load_state_dict(state["tutor"])
        if "policy" in state:
            self.task.policy.load_state_dict(state["policy"])

    def _checkpoint(self) -> None:
        self.run.save_checkpoint(self.state_dict())

    def _log(self, record: dict) -> None:
        self.run.append_metrics(record)
        self.p.metrics_lines += 1

    # -- the loop --------------------------------------------------------------------------------
    def fit(self) -> dict:
        state = self.run.load_checkpoint()
        if state is not None:
            self.load_state_dict(state)
            self.run.truncate_metrics(self.p.metrics_lines)
        else:
            self.run.truncate_metrics(0)
        if self.probe is not None and self.p.probe_loss is None:
            self.p.probe_loss = self._probe_loss()
        started = time.time()
        while not self.p.stopped and self.p.epoch < self.cfg.epochs:
            self._train_epoch()
            self._end_epoch()
        return self._final(time.time() - started)

    def _train_epoch(self) -> None:
        from tqdm.auto import tqdm

        batches = self._batches(self.p.epoch)
        for source in (self.task.teacher, self.task.tutor):
            if hasattr(source, "start_epoch"):
                source.start_epoch(self.p.epoch)
        bar = tqdm(total=len(batches), initial=self.p.batch, disable=not self.progress, leave=False,
                   desc=f"{self.run.path.name} epoch {self.p.epoch + 1}/{self.cfg.epochs}", unit="batch")
        for index in batches[self.p.batch:]:
            record = self._train_step(index)
            self.p.batch += 1
            self.p.step += 1
            self.p.window[0] += record["loss"]
            self.p.window[1] += 1
            self.p.window[2] += record.get("teacher_weight", 0.0)
            if self.p.step % self.log_every == 0:
                log = {"type": "train", "epoch": self.p.epoch, "step": self.p.step,
                       "loss": self.p.window[0] / self.p.window[1], "lr": self.student.scheduler.get_last_lr()[0]}
                if self.task.teacher is not None:
                    log["teacher_share"] = self.p.window[2] / self.p.window[1]  # mean teacher weight per batch
                self._log(log)
                self.p.window = [0.0, 0, 0.0]
            if self.p.step % self.checkpoint_every == 0:
                self._checkpoint()
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            if self.on_step is not None:
                self.on_step(self, record)
        bar.close()

    def _batches(self, epoch: int) -> list[np.ndarray]:
        return [self.train_index[b] for b in train_batches(self.train_lengths, self.cfg.batch_size, self.seed, epoch)]

    def _train_step(self, index: np.ndarray) -> dict:
        """One optimiser step on the training examples at ``index``."""
        batch = {k: v.to(self.device) for k, v in self.data.encoded["train"].collate(index).items()}
        return self._step(batch)

    def _evaluate(self, model, split: str, per_example: bool = False) -> dict:
        return evaluate(model, self.data.encoded[split], self.cfg.eval_batch_size, self.data.num_labels, self.device,
                        per_example=per_example)

    def _save(self, model, path) -> None:
        save_model(model, self.tokenizer, path)

    def _step(self, batch) -> dict:
        """One optimiser step of the student (and, in TEID with an online tutor, maybe the tutor)."""
        task, y = self.task, batch["labels"]
        z_s = forward(self.student.model, batch)
        record = {"step": self.p.step}
        if task.teacher is None:  # fine-tuning
            loss = losses.cross_entropy(z_s, y).mean()
        else:
            z_t = task.teacher.logits(batch)
            l_t = losses.distillation_loss(z_s, z_t, y, task.tau, task.alpha, task.term)
            if task.tutor is None:  # classic KD (Algorithm 1)
                loss, w = l_t.mean(), torch.ones_like(l_t)
            else:  # TEID (Algorithm 2)
                z_u = task.tutor.logits(batch)
                l_u = losses.distillation_loss(z_s, z_u.detach(), y, task.tau, task.alpha, task.term)
                w = task.policy.select(Selection(l_t.detach(), l_u.detach(), z_s.detach(), z_t, z_u.detach(), y,
                                                 self.p.step, self.total_steps)).to(l_t.dtype)
                if task.policy.mixes_targets:
                    z_mix = losses.mix_targets(z_t, z_u.detach(), w, task.tau, task.term)
                    loss = losses.distillation_loss(z_s, z_mix, y, task.tau, task.alpha, task.term).mean()
                else:
                    loss = (w * l_t + (1 - w) * l_u).mean()
                record["tutor_updated"] = False
                if task.tutor.trainable and float(w.sum()) > 0:
                    # "Update tutor model U from teacher model T", on the examples the teacher won.
                    z_live = z_u if task.tutor.live else task.tutor.live_logits(batch)
                    l_ut = losses.distillation_loss(z_live, z_t, y, task.tau, task.alpha, task.term)
                    task.tutor.update((w * l_ut).sum() / w.sum())
                    record["tutor_updated"] = True
            self._count(w)
            record["teacher_weight"] = float(w.mean())
        self.student.step(loss)
        if self.probe is not None:  # the bandit's reward: the student's progress on held-out data
            now = self._probe_loss()
            task.policy.feedback(self.p.probe_loss - now)
            self.p.probe_loss = now
        record["loss"] = float(loss.detach())
        return record

    def _probe_loss(self) -> float:
        model = self.student.model
        model.eval()
        with torch.no_grad():
            batch = {k: v.to(self.device) for k, v in self.data.encoded["train"].collate(self.probe).items()}
            value = float(losses.cross_entropy(forward(model, batch), batch["labels"]).mean())
        model.train()
        return value

    def _count(self, w: torch.Tensor) -> None:
        s = self.p.selection
        if bool((w == 1).all()):
            s["teacher_batches"] += 1
        elif bool((w == 0).all()):
            s["tutor_batches"] += 1
        else:
            s["mixed_batches"] += 1
        s["teacher_weight"] += float(w.sum())
        s["examples"] += int(w.numel())

    def _end_epoch(self) -> None:
        """Validate, keep the best model, early-stop, record the epoch, checkpoint."""
        val = self._evaluate(self.student.model, "validation")
        improved = val["accuracy"] > self.p.best_accuracy
        if improved:
            self.p.best_accuracy, self.p.best_epoch, self.p.bad_epochs = val["accuracy"], self.p.epoch, 0
            self._save(self.student.model, self.run.model)
            if self.task.tutor is not None and self.task.tutor.trainable:
                self._save(self.task.tutor.model, self.run.tutor)  # the tutor paired with it
        else:
            self.p.bad_epochs += 1
        record = {"type": "epoch", "epoch": self.p.epoch, "step": self.p.step, "improved": improved,
                  "val_accuracy": val["accuracy"], "val_macro_f1": val["macro_f1"], "val_collapsed": val["collapsed"]}
        if self.task.teacher is not None:
            sel = self.p.selection
            record["selection"] = {**sel, "teacher_share": sel["teacher_weight"] / max(1, sel["examples"])}
        self._log(record)
        self.p.epoch += 1
        self.p.batch = 0
        self.p.selection = _new_selection()
        self.p.stopped = self.p.bad_epochs >= self.cfg.patience
        self._checkpoint()

    def _final(self, seconds: float) -> dict:
        from .models import load_classifier

        best = load_classifier(self.run.model).to(self.device)
        result = {"kind": self.task.kind, "best_epoch": self.p.best_epoch, "epochs_run": self.p.epoch,
                  "steps": self.p.step, "train_seconds": round(seconds, 2)}
        for split in ("validation", "test"):
            if split in self.data.encoded:
                result[split] = self._evaluate(best, split, per_example=True)
        epochs = [m for m in self.run.metrics() if m["type"] == "epoch"]
        if self.task.teacher is not None:
            result["selection_per_epoch"] = [m["selection"] for m in epochs]
            totals = {k: sum(e["selection"][k] for e in epochs) for k in _new_selection()}  # over all epochs
            totals["teacher_share"] = totals["teacher_weight"] / max(1, totals["examples"])
            result["selection"] = totals
        if self.run.tutor.exists():
            tutor = load_classifier(self.run.tutor).to(self.device)
            result["tutor_validation"] = self._evaluate(tutor, "validation")
        return result
