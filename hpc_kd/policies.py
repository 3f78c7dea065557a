"""Selection policies: for each batch, how much the student learns from the teacher vs the tutor.

A policy sees the per-example distillation losses against both sources (and the logits and
labels) and returns ``w``, one weight per example in [0, 1]: 1 means "learn from the teacher",
0 "learn from the tutor". The student's loss is ``mean(w · L_T + (1 − w) · L_U)``; in online
tutor mode the tutor takes a KD step toward the teacher on the examples where ``w > 0``.

A batch-level policy returns all ones or all zeros. Stateful policies keep their state in plain
values returned by ``state_dict()``, which the training checkpoint stores.

To add a policy: subclass :class:`Policy`, give it a ``name`` and register it in ``POLICIES``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Selection:
    """What a policy sees for one batch. Losses are detached, one value per example."""

    loss_teacher: torch.Tensor
    loss_tutor: torch.Tensor
    z_student: torch.Tensor
    z_teacher: torch.Tensor
    z_tutor: torch.Tensor
    labels: torch.Tensor
    step: int
    total_steps: int


class Policy:
    name = "base"
    #: True when the policy never looks at the tutor, so no tutor is needed at all (plain KD).
    teacher_only = False

    def select(self, sel: Selection) -> torch.Tensor:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class TeacherPolicy(Policy):
    """Always the teacher: classic KD (Algorithm 1). No tutor is loaded."""

    name = "teacher"
    teacher_only = True

    def select(self, sel: Selection) -> torch.Tensor:
        return torch.ones_like(sel.loss_teacher)


class TutorPolicy(Policy):
    """Always the tutor (the teacher is never selected, so an online tutor is never updated)."""

    name = "tutor"

    def select(self, sel: Selection) -> torch.Tensor:
        return torch.zeros_like(sel.loss_teacher)


class MinLossPolicy(Policy):
    """The paper's rule (Algorithm 2): the whole batch learns from the source whose mean
    distillation loss is strictly lower; ties go to the tutor, as in ``if L_T < L_U``."""

    name = "min_loss"

    def select(self, sel: Selection) -> torch.Tensor:
        teacher_wins = sel.loss_teacher.mean() < sel.loss_tutor.mean()
        return torch.full_like(sel.loss_teacher, 1.0 if bool(teacher_wins) else 0.0)


POLICIES: dict[str, type[Policy]] = {p.name: p for p in (TeacherPolicy, TutorPolicy, MinLossPolicy)}


def make_policy(name: str) -> Policy:
    return POLICIES[name]()
