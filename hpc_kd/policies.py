"""Selection policies: for each batch, how much the student learns from the teacher vs the tutor.

A policy sees the per-example distillation losses against both sources (and the logits and
labels) and returns ``w``, one weight per example in [0, 1]: 1 means "learn from the teacher",
0 "learn from the tutor". The student's loss is ``mean(w · L_T + (1 − w) · L_U)``; in online
tutor mode the tutor takes a KD step toward the teacher on the examples where ``w > 0``.

Every policy is defined for regression (one output, STS-B) too: the losses are then squared
errors (to each source's prediction, mixed with the gold one), compared like any other loss;
``correct_first`` and the confidence ``ensemble`` say below what they do there.

A batch-level policy returns all ones or all zeros. A policy with ``mixes_targets`` instead
mixes the two target distributions with ``w`` (the ensemble). A policy with a ``probe`` is told
the student's progress on a held-out slice after every step (``feedback``, the bandit). A policy
without ``needs_tutor`` is plain KD: no tutor is built, loaded or cached for it; one without
``needs_teacher`` either (``none``) is the baseline without a teacher. Stateful policies
keep their state in plain values returned by ``state_dict()``, which the training checkpoint stores.

The policy only decides ``w``; what is done with it (the student's loss, the tutor's update, the
counts) is :func:`hpc_kd.step.train_step`, the one TEID step.

To add a policy: subclass :class:`Policy`, give it a ``name`` and register it in ``POLICIES``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
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
    #: the run's seed (a policy that draws at random draws from it and the step: no state)
    seed: int = 0
    #: classes (z_*: logits [B, C]), regression (z_*: the prediction [B, 1]), or lm (a language
    #: model: z_* are per-sequence summaries [B, 2], the share of predicted tokens whose top-1 is the
    #: gold next token and the mean top-1 probability; labels are 0)
    kind: str = "classes"


class Policy:
    name = "base"
    #: False when the policy never looks at the tutor, so no tutor is needed at all (plain KD).
    needs_tutor = True
    #: False when the student learns from no model at all (the baseline): no teacher targets.
    needs_teacher = True
    #: True when ``w`` mixes the two target distributions instead of the two losses.
    mixes_targets = False
    #: constructor arguments, taken from ``distill.<policy>_<param>`` config keys.
    params: tuple[str, ...] = ()
    #: examples of the training split held out to measure the student (None: none needed); the
    #: trainer then calls :meth:`feedback` after every step.
    probe: int | None = None

    def select(self, sel: Selection) -> torch.Tensor:
        raise NotImplementedError

    def feedback(self, reward: float) -> None:
        """The drop in the student's loss on the probe slice over the last step (policies with a probe)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class NoTeacherPolicy(Policy):
    """No teacher: the student learns from the gold labels (a language model: the next tokens)
    alone, the baseline that distillation must beat. Nothing is cached, no tutor is built; the
    stage's soft-target settings are fixed (alpha 0) so that one such run serves every cell of a
    grid over tau, alpha or the divergence."""

    name = "none"
    needs_tutor = False
    needs_teacher = False


class TeacherPolicy(Policy):
    """Always the teacher: classic KD (Algorithm 1). No tutor is loaded (the trainer never asks
    this policy: without a tutor every example learns from the teacher)."""

    name = "teacher"
    needs_tutor = False


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


class MinLossSamplePolicy(Policy):
    """The min-loss rule per example: each example learns from whichever source has the lower
    distillation loss on it (ties to the tutor)."""

    name = "min_loss_sample"

    def select(self, sel: Selection) -> torch.Tensor:
        return (sel.loss_teacher < sel.loss_tutor).to(sel.loss_teacher.dtype)


class NormalizedPolicy(Policy):
    """The paper's suggested fix ("scaling factors"): compare each source's batch loss relative to
    its own running mean, ``L_T / m_T < L_U / m_U``, so a source whose losses are simply on a
    smaller scale (the tutor, closer in size to the student) does not win by default.

    ``m`` is an exponential moving average (``momentum``) updated after each decision; the first
    batch compares raw losses (there is no mean yet).
    """

    name = "normalized"
    params = ("momentum",)

    def __init__(self, momentum: float = 0.9):
        self.momentum = momentum
        self.mean_teacher = self.mean_tutor = None

    def select(self, sel: Selection) -> torch.Tensor:
        lt, lu = float(sel.loss_teacher.mean()), float(sel.loss_tutor.mean())
        if self.mean_teacher is None:  # the first batch: raw losses
            teacher_wins = lt < lu
            self.mean_teacher, self.mean_tutor = lt, lu
        else:
            teacher_wins = lt / max(self.mean_teacher, 1e-12) < lu / max(self.mean_tutor, 1e-12)
        m = self.momentum
        self.mean_teacher = m * self.mean_teacher + (1 - m) * lt
        self.mean_tutor = m * self.mean_tutor + (1 - m) * lu
        return torch.full_like(sel.loss_teacher, 1.0 if teacher_wins else 0.0)

    def state_dict(self):
        return {"mean_teacher": self.mean_teacher, "mean_tutor": self.mean_tutor}

    def load_state_dict(self, state):
        self.mean_teacher, self.mean_tutor = state["mean_teacher"], state["mean_tutor"]


class CorrectFirstPolicy(Policy):
    """Per example: the source whose prediction is right on the gold label; when both or neither
    are right, the one with the lower distillation loss (ties to the tutor). Regression has no
    "right": the source whose prediction is strictly closer to the gold value counts as right; for
    a language model, the source whose top-1 is the gold next token at strictly more of the
    sequence's tokens."""

    name = "correct_first"

    def select(self, sel: Selection) -> torch.Tensor:
        if sel.kind == "regression":
            err_t = (sel.z_teacher[:, 0] - sel.labels).abs()
            err_u = (sel.z_tutor[:, 0] - sel.labels).abs()
            t_right, u_right = err_t < err_u, err_u < err_t
        elif sel.kind == "lm":
            t_right, u_right = sel.z_teacher[:, 0] > sel.z_tutor[:, 0], sel.z_tutor[:, 0] > sel.z_teacher[:, 0]
        else:
            t_right = sel.z_teacher.argmax(-1) == sel.labels
            u_right = sel.z_tutor.argmax(-1) == sel.labels
        lower = sel.loss_teacher < sel.loss_tutor
        pick = torch.where(t_right == u_right, lower, t_right)
        return pick.to(sel.loss_teacher.dtype)


class RandomPolicy(Policy):
    """The control (DGKD-style): each batch learns from the teacher with probability
    ``teacher_prob``, else from the tutor, drawn independently of the losses. The draw is a pure
    function of the run's seed and the step, so it is the same on every rank and after a resume,
    and two policies compared on one seed see the same coins only if they are this one."""

    name = "random"
    params = ("teacher_prob",)

    def __init__(self, teacher_prob: float = 0.5):
        self.teacher_prob = teacher_prob

    def teacher_wins(self, seed: int, step: int) -> bool:
        return bool(np.random.default_rng([seed, step, 0x7E1D]).random() < self.teacher_prob)

    def select(self, sel: Selection) -> torch.Tensor:
        return torch.full_like(sel.loss_teacher, 1.0 if self.teacher_wins(sel.seed, sel.step) else 0.0)


class AnnealPolicy(Policy):
    """A schedule from tutor to teacher over training (dynamic-KD style): the teacher's weight
    ``w(p)`` rises from 0 to 1 with training progress ``p = step / total_steps``, and the student's
    loss mixes ``w · L_T + (1 − w) · L_U``. Shapes: ``linear`` (w = p), ``cosine``
    (w = (1 − cos πp) / 2), ``step`` (tutor for the first half, teacher after)."""

    name = "anneal"
    params = ("shape",)

    def __init__(self, shape: str = "linear"):
        self.shape = shape

    def weight(self, step: int, total: int) -> float:
        p = min(1.0, step / max(1, total - 1))
        if self.shape == "linear":
            return p
        if self.shape == "cosine":
            return 0.5 * (1 - math.cos(math.pi * p))
        return 1.0 if p >= 0.5 else 0.0

    def select(self, sel: Selection) -> torch.Tensor:
        return torch.full_like(sel.loss_teacher, self.weight(sel.step, sel.total_steps))


class EnsemblePolicy(Policy):
    """Targets from a weighted mix of the two distributions,
    ``p = w · softmax(z_T/τ) + (1 − w) · softmax(z_U/τ)``, with ``w`` fixed (``weight``) or, when
    ``weight`` is None, per example by confidence: ``w = c_T / (c_T + c_U)``, c the max probability.
    Regression mixes the two predictions, ``w · z_T + (1 − w) · z_U``; one output carries no
    confidence, so there ``weight`` None is an even mix (w = 0.5). A language model mixes the two
    distributions at every token of a sequence with one weight, by their mean top-1 probability."""

    name = "ensemble"
    mixes_targets = True
    params = ("weight",)

    def __init__(self, weight: float | None = None):
        self.weight = weight

    def select(self, sel: Selection) -> torch.Tensor:
        if self.weight is not None:
            return torch.full_like(sel.loss_teacher, self.weight)
        if sel.kind == "regression":
            return torch.full_like(sel.loss_teacher, 0.5)
        if sel.kind == "lm":  # the mean top-1 probability over the sequence's tokens
            c_t, c_u = sel.z_teacher[:, 1], sel.z_tutor[:, 1]
        else:
            c_t = sel.z_teacher.softmax(-1).max(-1).values
            c_u = sel.z_tutor.softmax(-1).max(-1).values
        return (c_t / (c_t + c_u)).to(sel.loss_teacher.dtype)


class BanditPolicy(Policy):
    """UCB1 over the two sources. After each step the trainer reports the reward, the drop in the
    student's gold loss (cross-entropy; squared error for regression) on a held-out slice of the
    training data (``probe`` examples kept out of training); the source with the highest
    ``mean reward + c · scale · sqrt(2 ln t / n)`` is picked for the next batch (each source is tried once first). ``scale`` is the running mean
    absolute reward, so ``c`` does not depend on the loss scale."""

    name = "bandit"
    params = ("c", "probe")

    def __init__(self, c: float = 1.0, probe: int = 64):
        self.c, self.probe = c, probe
        self.counts, self.sums, self.abs_sum, self.last = [0, 0], [0.0, 0.0], 0.0, None

    def select(self, sel: Selection) -> torch.Tensor:
        t = sum(self.counts)
        if 0 in self.counts:
            arm = self.counts.index(0)
        else:
            scale = self.abs_sum / t or 1.0
            ucb = [self.sums[a] / self.counts[a] + self.c * scale * math.sqrt(2 * math.log(t) / self.counts[a])
                   for a in (0, 1)]
            arm = 0 if ucb[0] > ucb[1] else 1  # arm 0: teacher; ties to the tutor
        self.last = arm
        return torch.full_like(sel.loss_teacher, 1.0 if arm == 0 else 0.0)

    def feedback(self, reward: float) -> None:
        self.counts[self.last] += 1
        self.sums[self.last] += reward
        self.abs_sum += abs(reward)

    def state_dict(self):
        return {"counts": list(self.counts), "sums": list(self.sums), "abs_sum": self.abs_sum, "last": self.last}

    def load_state_dict(self, state):
        self.counts, self.sums = list(state["counts"]), list(state["sums"])
        self.abs_sum, self.last = state["abs_sum"], state["last"]


POLICIES: dict[str, type[Policy]] = {p.name: p for p in (
    TeacherPolicy, TutorPolicy, MinLossPolicy, MinLossSamplePolicy, NormalizedPolicy, CorrectFirstPolicy,
    RandomPolicy, AnnealPolicy, EnsemblePolicy, BanditPolicy, NoTeacherPolicy)}
#: the policies that distil (all but the baseline ``none``)
DISTILLING = tuple(name for name, p in POLICIES.items() if p.needs_teacher)


def make_policy(name: str, args: dict | None = None) -> Policy:
    return POLICIES[name](**(args or {}))


def policy_args(distill) -> dict:
    """The constructor arguments of ``distill.policy``, from its ``<policy>_<param>`` config keys
    (only the chosen policy's keys enter a stage's signature)."""
    return {name: getattr(distill, f"{distill.policy}_{name}") for name in POLICIES[distill.policy].params}
