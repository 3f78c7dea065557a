"""The one training loop. Fine-tuning, classic KD and TEID differ only in their
:class:`hpc_kd.step.Task`: where the targets come from (none, a teacher, a teacher and a tutor)
and which loss applies; the step itself is :func:`hpc_kd.step.train_step`.

All mutable training state is one dict (models, optimisers, schedules, step, RNG, policy and
early-stopping state, selection counts); the checkpoint is exactly that dict, so a run resumed
from it ends bit-identical to an uninterrupted one on the same machine.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from . import distributed, losses
from .config import TrainConfig
from .data import Dataset, Encoded, eval_batches, train_batches
from .metrics import task_metrics
from .models import save_model
from .rundir import RunDir
from .sources import forward
from .step import Micro, Task, new_selection, train_step


def param_groups(model, cfg: TrainConfig) -> list[dict]:
    """AdamW parameter groups over the trainable parameters: weight decay on matrices, none on
    biases and LayerNorm."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    return [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(model, cfg: TrainConfig) -> torch.optim.AdamW:
    """The optimiser of every trainee: AdamW over :func:`param_groups`, fused (one kernel for all
    parameters: on CPU five times faster than the per-parameter loop, which for a small student
    was 40% of a step; the same update up to rounding). ``cfg.freeze_embeddings`` takes the input
    token embeddings (and the output layer tied to them) out of training first."""
    if cfg.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    return torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, fused=True)


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
        self.schedule = linear_schedule(cfg, total_steps)
        self.optimizer = adamw(model, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.schedule)
        self.last_rate: float | None = None  # the rate of the last step taken with ``at``

    def step(self, loss: torch.Tensor, at: int | None = None, share: float = 1.0) -> None:
        """One optimiser step. By default the schedule advances by one; with ``at`` (a tutor,
        which does not step every batch) the rate is the schedule's at step ``at``, times ``share``."""
        if at is not None:
            set_rate(self.scheduler, self.schedule(at) * share)
            self.last_rate = self.rate
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
        self.optimizer.step()
        if at is None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def rate(self) -> float:
        return self.scheduler.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def set_rate(scheduler, factor: float) -> None:
    """Set every parameter group's learning rate to its base rate x ``factor``."""
    for group, base in zip(scheduler.optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = base * factor


@dataclass
class Progress:
    """Counters that live in the checkpoint."""

    epoch: int = 0
    batch: int = 0  # batches done in the current epoch
    step: int = 0
    best_score: float = -math.inf  # the task's metric on validation (data.metric)
    best_epoch: int = -1
    bad_epochs: int = 0
    stopped: bool = False
    metrics_lines: int = 0
    window: list = field(default_factory=lambda: [0.0, 0, 0.0])  # loss sum, steps, teacher weight sum since last log
    probe_loss: float | None = None  # the student's loss on the held-out probe slice
    initial: dict | None = None  # a language model's token NLL per split before its first step
    threads: int = 0  # torch CPU threads the run started with (a resumed run keeps them)
    selection: dict = field(default_factory=dict)  # this epoch's counts

    @classmethod
    def restore(cls, state: dict) -> "Progress":
        """From a checkpoint's ``progress`` (one written before the task metric kept the best
        validation accuracy as ``best_accuracy``)."""
        state = dict(state)
        if "best_accuracy" in state:
            state["best_score"] = state.pop("best_accuracy")
        return cls(**state)


def evaluate(model, data: Encoded, batch_size: int, num_labels: int, device, per_example: bool = False,
             metric: str = "accuracy", reference=None) -> dict:
    """Metrics of ``model`` on ``data`` (:func:`hpc_kd.metrics.task_metrics`: ``score`` is
    ``metric``'s value); ``per_example`` adds, in the split's order, ``pred`` (the predicted class,
    or value for regression), for classification ``correct`` (0/1) and for a metric other than
    accuracy ``labels``, for paired comparisons between runs. On several ranks each predicts every
    ``ranks``-th length-sorted batch and every rank computes the metrics from all predictions
    (the one-process numbers); under ZeRO-3 a forward pass is collective, so ranks then run
    equally many batches (repeating one)."""
    world = distributed.current()
    batches = eval_batches(data.lengths, batch_size)
    mine = batches[world.rank::world.size]
    if distributed.partitioned(model):
        rounds = math.ceil(len(batches) / world.size)
        mine = mine + [batches[0]] * (rounds - len(mine))
    if data.lm:
        return _evaluate_lm(model, data, batches, mine, device, per_example, reference, batch_size)
    was_training = model.training
    model.eval()
    found = []
    with torch.no_grad():
        for i, index in enumerate(mine):
            batch = {k: v.to(device) for k, v in data.collate(index).items()}
            z = forward(model, batch).float()
            pred = (z[:, 0] if num_labels == 1 else z.argmax(-1)).to(torch.float64).cpu()
            if i * world.size + world.rank < len(batches):  # not a repeat
                found.append(torch.stack([torch.as_tensor(index, dtype=torch.float64), pred], dim=1))
    model.train(was_training)
    local = torch.cat(found) if found else torch.zeros((0, 2), dtype=torch.float64)
    table = distributed.gather_rows(local)
    preds = np.zeros(len(data), dtype=np.float64 if num_labels == 1 else np.int64)
    preds[table[:, 0].numpy().astype(np.int64)] = table[:, 1].numpy()
    metrics = task_metrics(data.labels, preds, num_labels, metric)
    if per_example:
        metrics["pred"] = preds.tolist()
        if num_labels > 1:
            metrics["correct"] = (preds == data.labels).astype(int).tolist()
        if metric != "accuracy":  # what a bootstrap of another metric needs beside the predictions
            metrics["labels"] = data.labels.tolist()
    return metrics


def _evaluate_lm(model, data: Encoded, batches, mine, device, per_example: bool, reference=None,
                 batch_size: int = 8) -> dict:
    """:func:`evaluate` for a language model: per sequence its summed next-token NLL, its number of
    predicted tokens and how many of them the top-1 got right, and over all tokens how often each
    token was the top-1 (:func:`hpc_kd.metrics.lm_metrics`); with a ``reference`` model (the
    teacher), ``teacher_agreement``: the share of tokens where both have the same top-1."""
    from .metrics import lm_metrics

    world = distributed.current()
    was_training = model.training
    model.eval()
    found = []
    hist = torch.zeros(model.get_output_embeddings().out_features, dtype=torch.float64)  # one size on every rank
    with torch.no_grad():
        for i, index in enumerate(mine):
            batch = {k: v.to(device) for k, v in data.collate(index).items()}
            z = forward(model, batch).float()[:, :-1]
            target = batch["labels"][:, 1:]
            mask = target != -100
            nll = torch.nn.functional.cross_entropy(z.reshape(-1, z.shape[-1]), target.reshape(-1), reduction="none",
                                                    ignore_index=-100).view(target.shape)
            top1 = z.argmax(-1)
            agree = torch.zeros(len(index), dtype=torch.float64)
            if reference is not None:
                ref = forward(reference, batch).float()[:, :-1].argmax(-1)
                agree = ((ref == top1) & mask).sum(-1).double().cpu()
            if i * world.size + world.rank < len(batches):  # not a repeat
                hist += torch.bincount(top1[mask].cpu(), minlength=z.shape[-1]).to(torch.float64)
                found.append(torch.stack([torch.as_tensor(index, dtype=torch.float64), (nll * mask).sum(-1).double().cpu(),
                                          mask.sum(-1).double().cpu(), ((top1 == target) & mask).sum(-1).double().cpu(),
                                          agree], 1))
    model.train(was_training)
    table = distributed.gather_rows(torch.cat(found) if found else torch.zeros((0, 5), dtype=torch.float64))
    hist = distributed.all_sum(hist)
    order = np.argsort(table[:, 0].numpy())
    nll, tokens, right = (table[order, j].numpy() for j in (1, 2, 3))
    metrics = lm_metrics(nll, tokens, right, hist.numpy())
    if reference is not None:
        metrics["teacher_agreement"] = float(table[order, 4].sum() / max(tokens.sum(), 1.0))
    if per_example:
        metrics["nll"] = nll.tolist()
        metrics["tokens"] = tokens.astype(int).tolist()
    if data.choices is not None:
        picked = choice_scores(model, data.choices, batch_size, device).argmax(1)
        gold = data.choices.labels[::data.choices.answers]
        metrics["choice_accuracy"] = float((picked == gold).mean())
        if per_example:
            metrics["choice_correct"] = (picked == gold).astype(int).tolist()
    return metrics


def choice_scores(model, choices: Encoded, batch_size: int, device) -> np.ndarray:
    """lm-eval-style multiple choice: each example's answers (``choices``: example-major, the
    answer's tokens the only targets) scored by the model's summed log-likelihood of the answer
    after the prompt; [examples, answers] (the gold answer of example i: ``choices.labels[i *
    answers]``). Every rank scores every answer (the same forward passes on each: collective
    under ZeRO-3, and the same numbers)."""
    was_training = model.training
    model.eval()
    score = np.zeros(len(choices), dtype=np.float64)
    with torch.no_grad():
        for index in eval_batches(choices.lengths, batch_size):
            batch = {k: v.to(device) for k, v in choices.collate(index).items()}
            z = forward(model, batch).float()[:, :-1]
            target = batch["labels"][:, 1:]
            nll = torch.nn.functional.cross_entropy(z.reshape(-1, z.shape[-1]), target.reshape(-1), reduction="none",
                                                    ignore_index=-100).view(target.shape)
            score[index] = -nll.sum(-1).double().cpu().numpy()
    model.train(was_training)
    return score.reshape(-1, choices.answers)


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
        probe_size = task.policy.probe if task.tutor is not None else None
        order = np.random.default_rng(seed).permutation(n)
        self.probe = np.sort(order[:probe_size]) if probe_size else None
        self.train_index = np.sort(order[probe_size:]) if probe_size else np.arange(n)
        self.train_lengths = dataset.encoded["train"].lengths[self.train_index]
        self.batches_per_epoch = len(self._batches(0))
        self.total_steps = cfg.epochs * self.batches_per_epoch
        torch.manual_seed(seed)
        self.student = self._trainee(student.to(self.device).train(), cfg)
        if task.tutor_learns:
            task.tutor.start(self._trainee)
        self.p = Progress(selection=new_selection())
        #: a language model's teacher, for the top-1 agreement of the final evaluation (set by the stage)
        self.reference = None

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
        if self.task.tutor_learns:
            state["tutor"] = self.task.tutor.trainee.state_dict()
        if self.task.policy is not None:
            state["policy"] = self.task.policy.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.student.load_state_dict(state["student"])
        self.p = Progress.restore(state["progress"])
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
            if self.p.threads and self.p.threads != torch.get_num_threads():
                # CPU kernels split work by thread: the last bits of a result depend on the count
                print(f"[hpc_kd] resuming with {self.p.threads} threads, as the run started "
                      f"(not {torch.get_num_threads()}), so that it ends as an uninterrupted run", flush=True)
                torch.set_num_threads(self.p.threads)
        else:
            self.run.truncate_metrics(0)
            self.p.threads = torch.get_num_threads()
        if self.probe is not None and self.p.probe_loss is None:
            self.p.probe_loss = self._probe_loss()
        if self.data.encoded["train"].lm and self.p.initial is None:  # where it started: did it learn?
            self.p.initial = {split: self._evaluate(self.student.model, split)["token_nll"]
                              for split in ("validation", "test") if split in self.data.encoded}
        started = time.time()
        while not self.p.stopped and self.p.epoch < self.cfg.epochs:
            self._train_epoch()
            self._end_epoch()
        return self._final(time.time() - started)

    def _train_epoch(self) -> None:
        from tqdm.auto import tqdm

        batches = self._batches(self.p.epoch)
        for source in (self.task.teacher, self.task.tutor):
            if source is not None:
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
                    log["selection"] = dict(self.p.selection)  # this epoch's counts so far
                if "tutor_tail" in record:  # this step's: the tutor's mass outside the cached teacher's entries
                    log["tutor_tail"] = record["tutor_tail"]
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

    def _micro_batches(self, index: np.ndarray) -> list[Micro]:
        """This process's part of the batch ``index``: all of it, in one piece."""
        batch = {k: v.to(self.device) for k, v in self.data.encoded["train"].collate(index).items()}
        return [Micro(batch, torch.ones(len(index), device=self.device), 0, len(index))]

    def _train_step(self, index: np.ndarray) -> dict:
        """One optimiser step on the training examples at ``index`` (and the bandit's feedback:
        the student's progress on held-out data)."""
        record = train_step(self.task, self.student, self._micro_batches(index), len(index), step=self.p.step,
                            total_steps=self.total_steps, seed=self.seed, selection=self.p.selection)
        if self.probe is not None:
            now = self._probe_loss()
            self.task.policy.feedback(self.p.probe_loss - now)
            self.p.probe_loss = now
        return record

    def _evaluate(self, model, split: str, per_example: bool = False, reference=None) -> dict:
        return evaluate(model, self.data.encoded[split], self.cfg.eval_batch_size, self.data.num_labels, self.device,
                        per_example=per_example, metric=self.data.metric, reference=reference)

    def _save(self, model, path) -> None:
        save_model(model, self.tokenizer, path)

    def _probe_loss(self) -> float:
        model = self.student.model
        model.eval()
        with torch.no_grad():
            batch = {k: v.to(self.device) for k, v in self.data.encoded["train"].collate(self.probe).items()}
            value = float(losses.gold_loss(forward(model, batch), batch["labels"]).mean())
        model.train()
        return value

    def _end_epoch(self) -> None:
        """Validate, keep the best model, early-stop, record the epoch, checkpoint."""
        val = self._evaluate(self.student.model, "validation")
        improved = val["score"] > self.p.best_score
        if improved:
            self.p.best_score, self.p.best_epoch, self.p.bad_epochs = val["score"], self.p.epoch, 0
            self._save(self.student.model, self.run.model)
            if self.task.tutor_learns:
                self._save(self.task.tutor.model, self.run.tutor)  # the tutor paired with it
        else:
            self.p.bad_epochs += 1
        record = {"type": "epoch", "epoch": self.p.epoch, "step": self.p.step, "improved": improved,
                  f"val_{val['metric']}": val.get(val["metric"], val["score"]), "val_collapsed": val["collapsed"]}
        for name in ("accuracy", "macro_f1"):  # beside the task's metric, for classes
            if name in val:
                record[f"val_{name}"] = val[name]
        if self.task.teacher is not None:
            sel = self.p.selection
            record["selection"] = {**sel, "teacher_share": sel["teacher_weight"] / max(1, sel["examples"])}
        self._log(record)
        self.p.epoch += 1
        self.p.batch = 0
        self.p.selection = new_selection()
        self.p.stopped = self.p.bad_epochs >= self.cfg.patience
        self._checkpoint()

    def _final(self, seconds: float) -> dict:
        from .models import load_classifier

        best = load_classifier(self.run.model).to(self.device)
        result = {"kind": self.task.kind, "threads": self.p.threads, "best_epoch": self.p.best_epoch, "epochs_run": self.p.epoch,
                  "steps": self.p.step, "train_seconds": round(seconds, 2)}
        if self.p.initial is not None:
            result["initial_token_nll"] = self.p.initial
        for split in self.data.reported:  # validation, test, data.also_evaluate
            result[split] = self._evaluate(best, split, per_example=True, reference=self.reference)
        epochs = [m for m in self.run.metrics() if m["type"] == "epoch"]
        if self.task.teacher is not None:
            result["selection_per_epoch"] = [m["selection"] for m in epochs]
            totals = {k: sum(e["selection"][k] for e in epochs) for k in new_selection()}  # over all epochs
            totals["teacher_share"] = totals["teacher_weight"] / max(1, totals["examples"])
            result["selection"] = totals
        if self.run.tutor.exists():
            tutor = load_classifier(self.run.tutor).to(self.device)
            result["tutor_validation"] = self._evaluate(tutor, "validation")
        if self.data.encoded["train"].lm:  # for people to read, and the degenerate flag's repetition criterion
            from .metrics import repetition, with_repetition
            from .models import PROMPTS, greedy_ids

            prompts = self.data.prompts or PROMPTS  # chat data: the first validation conversations
            ids = greedy_ids(best, self.tokenizer, prompts, device=self.device, rendered=bool(self.data.prompts))
            result["continuations"] = {p: self.tokenizer.decode(ids[p], skip_special_tokens=True) for p in prompts}
            share = repetition(ids.values())
            for split in self.data.reported:
                result[split] = with_repetition(result[split], share)
        return result
