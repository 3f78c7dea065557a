"""Target sources: where a distillation step gets the logits it learns from, and what the tutor is.

Every source satisfies :class:`TargetSource`: ``logits(batch)`` and ``start_epoch(epoch)``. A
tutor that keeps learning (:class:`OnlineTutor`, :class:`RefreshTutor`) is also a
:class:`LearningTutor`: it has a trainee, forward passes with a graph (``live_logits``) and
``update(loss, at, share)``.

:class:`TutorMode` is the one answer to "is there a tutor, does it learn, and where do its
selection logits come from"; the plan resolves it once per student (from the policy and
``distill.tutor_update``) and every other module reads it.
"""
from __future__ import annotations

import enum
from typing import Callable, Protocol, runtime_checkable

import torch

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")  # the last: pair tasks only


def forward(model, batch) -> torch.Tensor:
    return model(**{k: batch[k] for k in MODEL_INPUTS if k in batch}).logits


class TutorMode(str, enum.Enum):
    """The tutor of a distillation stage.

    - ``none``: plain KD, the policy never looks at a tutor (none is built, loaded or cached);
    - ``frozen``: it does not learn; its logits come from a cache (or live, with ``targets: live``);
    - ``online``: it keeps learning from the teacher, its logits computed live (Algorithm 2);
    - ``refresh``: it learns, but its selection logits come from a cache rebuilt every epoch.
    """

    NONE = "none"
    FROZEN = "frozen"
    ONLINE = "online"
    REFRESH = "refresh"

    @classmethod
    def resolve(cls, needs_tutor: bool, tutor_update: str) -> "TutorMode":
        return cls(tutor_update) if needs_tutor else cls.NONE

    @property
    def exists(self) -> bool:
        return self is not TutorMode.NONE

    @property
    def learns(self) -> bool:
        """It is updated from the teacher during the run (and saved beside the student)."""
        return self in (TutorMode.ONLINE, TutorMode.REFRESH)

    def cached(self, targets: str) -> bool:
        """Its logits are read from the tutor's logit-cache stage (frozen, with cached targets)."""
        return self is TutorMode.FROZEN and targets == "cache"

    @property
    def label(self) -> str | None:
        """What a stage, a result and a table row record (None for plain KD)."""
        return self.value if self.exists else None


@runtime_checkable
class TargetSource(Protocol):
    """Logits to distil from, one row per example of a batch."""

    def logits(self, batch) -> torch.Tensor: ...

    def start_epoch(self, epoch: int) -> None: ...


class Source:
    """Base of the sources here: nothing to do at an epoch's start; does not learn."""

    def start_epoch(self, epoch: int) -> None:
        pass


class FrozenModel(Source):
    """Targets from a model in eval mode, without gradients (the teacher of Algorithms 1 and 2)."""

    def __init__(self, model):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def logits(self, batch) -> torch.Tensor:
        return forward(self.model, batch)


class CachedLogits(Source):
    """Targets read by example id from a validated logit cache: no model is loaded at all."""

    def __init__(self, cache, device):
        self.cache, self.device = cache, device

    def logits(self, batch) -> torch.Tensor:
        if hasattr(self.cache, "targets"):  # a language model's sparse targets (hpc_kd.sparse.SparseTargets)
            t = self.cache.targets(batch["example_ids"], batch["input_ids"].shape[1])
            return type(t)(t.ids.to(self.device), t.log_probs.to(self.device), t.tail.to(self.device), t.precision)
        return self.cache.logits(batch["example_ids"]).to(self.device)


class OnlineTutor(Source):
    """A tutor that keeps learning from the teacher (Algorithm 2, "update tutor U from teacher T").

    As in the paper it is in evaluation mode (no dropout); its logits keep their graph so that,
    when the teacher is selected, the KD step toward the teacher reuses the same forward pass.
    """

    #: its selection logits are those of its current weights (so they can serve its update)
    live = True

    def __init__(self, model, cfg):
        self.model, self.cfg, self.trainee = model.eval(), cfg, None

    def start(self, make: Callable) -> None:
        """Build its trainee once the run's length is known: ``make(model, cfg)`` (the trainer's
        own kind: plain AdamW or a DeepSpeed engine; its schedule spans the student's run)."""
        self.trainee = make(self.model, self.cfg)

    def logits(self, batch) -> torch.Tensor:
        return forward(self.model, batch)

    def live_logits(self, batch) -> torch.Tensor:
        """Logits of the current weights, with a graph (for its own update)."""
        return forward(self.model, batch)

    def update(self, loss: torch.Tensor, at: int, share: float) -> None:
        """One step toward the teacher at the student's step ``at``: the learning rate is the
        schedule's value there, times ``share`` (the teacher's share of the batch)."""
        self.trainee.step(loss, at=at, share=share)


class RefreshTutor(OnlineTutor):
    """``tutor_update: refresh``: the tutor still learns from the teacher during the epoch, but the
    student compares against the tutor's logits cached at the start of the epoch; the cache is
    rebuilt at every epoch boundary (``make_cache(epoch)`` returns a LogitCache), so selection
    costs no tutor forward pass and only teacher-selected batches run the tutor."""

    live = False

    def __init__(self, model, cfg, make_cache, device):
        super().__init__(model, cfg)
        self.make_cache, self.device, self.cache = make_cache, device, None

    def start_epoch(self, epoch: int) -> None:
        self.cache = self.make_cache(epoch)

    def logits(self, batch) -> torch.Tensor:
        return self.cache.logits(batch["example_ids"]).to(self.device)


LearningTutor = OnlineTutor  # the type of every tutor that learns (RefreshTutor is one)
