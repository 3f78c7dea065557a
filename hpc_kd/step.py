"""One training step, the same for every trainer: fine-tuning, classic KD and TEID.

:func:`train_step` is the only place where a step's decisions are made: both sources' losses,
the policy's weights, the student's loss (mixed losses or mixed targets), the tutor's update from
the teacher and the selection counts. The one-process loop (:mod:`hpc_kd.loop`) and the DeepSpeed
trainer (:mod:`hpc_kd.engine`) differ only in how a batch is cut into micro-batches and in the
collectives, which are no-ops for one rank:

- a batch of ``n`` examples reaches a rank as one or more :class:`Micro` batches (its slice of
  the batch, cut again for gradient accumulation); a micro-batch's loss is the *sum* of its
  examples' losses x ``ranks`` x micro-batches / ``n``, so that after the gradient averaging over
  ranks and accumulation steps the step's gradient is exactly the mean over the batch;
- the policy sees the whole batch: per-example losses, logits and labels are gathered from every
  rank, every rank runs the policy (a stateful policy stays in step everywhere) and rank 0's
  weights are broadcast;
- with several micro-batches the policy must see all of them before any backward: a first pass
  without gradients computes what it sees and a second pass, replaying the same dropout masks,
  does forward + backward per micro-batch.

**The tutor's update rule** (the paper: "update tutor U from teacher T" when the teacher is
selected). With per-example or mixing weights ``w`` the teacher is selected for a share
``s = mean(w)`` of the batch. The tutor then takes one step on the teacher-weighted loss
``Σ w·L(U, T) / Σ w`` with its learning rate scaled by ``s``: a batch the teacher wins outright is
a full step, one example of 32 a step 1/32 as large, ``anneal`` at weight 0.3 a step 0.3 as large,
no teacher weight no step. The share scales the step size (the learning rate), not the loss,
because Adam divides out a loss's scale. The rate itself is the tutor's schedule at the
*student's* step, whether or not the tutor updated before: a tutor first updated late in the run
gets the rate scheduled there, not the start of its warm-up.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from . import distributed, losses, sparse
from .policies import Policy, Selection
from .sources import LearningTutor, TargetSource, forward


@dataclass
class Task:
    """What a run learns from. No teacher: fine-tuning with CE. A teacher: classic KD. A teacher
    and a tutor: TEID, with ``policy`` choosing the source per batch (or per example)."""

    teacher: TargetSource | None = None
    tutor: TargetSource | None = None
    policy: Policy | None = None
    tau: float = 1.0
    alpha: float = 0.5
    term: str = "kl"
    term_args: dict | None = None  # the term's parameters (jsd's beta, the skew terms' lambda)

    @property
    def kind(self) -> str:
        return "finetune" if self.teacher is None else ("kd" if self.tutor is None else "teid")

    @property
    def tutor_learns(self) -> bool:
        return isinstance(self.tutor, LearningTutor)

    def distill(self, z_s: torch.Tensor, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The per-example distillation loss of ``z_s`` toward target logits ``z``."""
        return losses.distillation_loss(z_s, z, y, self.tau, self.alpha, self.term, self.term_args)


@dataclass
class Micro:
    """This rank's part of a batch: ``real`` rows starting at row ``start`` of the whole batch
    (a rank with nothing to do runs one row with ``mask`` 0, to take part in the collectives)."""

    batch: dict
    mask: torch.Tensor
    start: int
    real: int


def new_selection() -> dict:
    """Selection counts (per epoch, summed for the run)."""
    return {"teacher_batches": 0, "tutor_batches": 0, "mixed_batches": 0, "teacher_weight": 0.0, "examples": 0}


def count(selection: dict, w: torch.Tensor) -> None:
    if bool((w == 1).all()):
        selection["teacher_batches"] += 1
    elif bool((w == 0).all()):
        selection["tutor_batches"] += 1
    else:
        selection["mixed_batches"] += 1
    selection["teacher_weight"] += float(w.sum())
    selection["examples"] += int(w.numel())


def train_step(task: Task, student, micro: list[Micro], n: int, *, step: int, total_steps: int, seed: int,
               selection: dict) -> dict:
    """One optimiser step of ``student`` (a trainee: ``.model``, ``.step(loss)``) on a batch of
    ``n`` examples, of which this rank holds ``micro``; updates ``selection`` (the counts) and a
    learning tutor. Returns the step's record: loss (batch mean), teacher weight, tutor update."""
    ranks = distributed.current().size
    scale = ranks * len(micro) / n
    record: dict = {"step": step}
    if task.tutor is None:
        loss_sum = 0.0
        for m in micro:
            z_s = forward(student.model, m.batch).float()
            y = m.batch["labels"]
            per_example = losses.gold_loss(z_s, y) if task.teacher is None else \
                task.distill(z_s, targets(task.teacher, m.batch), y)
            student.step((m.mask * per_example).sum() * scale)
            loss_sum += float((m.mask * per_example).detach().sum())
        if task.teacher is not None:
            count(selection, torch.ones(n))
            record["teacher_weight"] = 1.0
    else:
        loss_sum = _teid(task, student, micro, n, scale, step, total_steps, seed, selection, record)
    record["loss"] = float(distributed.all_sum([loss_sum])[0]) / n
    return record


def _teid(task: Task, student, micro: list[Micro], n: int, scale: float, step: int, total_steps: int, seed: int,
          selection: dict, record: dict) -> float:
    """TEID (Algorithm 2) on this rank's micro-batches: see the module docstring."""
    two_pass = len(micro) > 1
    rng = torch.get_rng_state() if two_pass else None
    outs = []
    for m in micro:
        with torch.no_grad() if two_pass else nullcontext():
            z_s = forward(student.model, m.batch).float()
            z_u = task.tutor.logits(m.batch)  # keeps its graph for a live online tutor's update
        outs.append(_losses(task, {"m": m, "z_s": z_s, "z_u": z_u, "z_t": targets(task.teacher, m.batch)}))
    w_all = select(task.policy, outs, step, total_steps, seed)
    total_w = float(w_all.sum())
    update_tutor = task.tutor_learns and total_w > 0  # the same on every rank: w_all is
    if two_pass:
        torch.set_rng_state(rng)
    loss_sum = 0.0
    for o in outs:
        m = o["m"]
        y = m.batch["labels"]
        if two_pass:
            o = _losses(task, {**o, "z_s": forward(student.model, m.batch).float()})
        w = w_all[m.start: m.start + m.real] if m.real else torch.zeros(1)
        w = w.to(o["l_t"].device, o["l_t"].dtype)
        if task.policy.mixes_targets:
            if sparse_targets(o["z_t"]):  # the two distributions mixed on the teacher's support
                z_mix = sparse.mix(o["z_t"], _on_support(o["z_u"], o["z_t"], task.tau), w)
            else:
                z_mix = losses.mix_targets(o["z_t"], o["z_u"].detach().float(), w, task.tau, task.term)
            per_example = task.distill(o["z_s"], z_mix, y)
        else:
            per_example = w * o["l_t"] + (1 - w) * o["l_u"]
        if update_tutor:  # "update tutor U from teacher T", weighted by the teacher's selection
            live = task.tutor.live and not two_pass
            z_live = o["z_u"] if live else task.tutor.live_logits(m.batch)
            l_ut = task.distill(z_live.float(), o["z_t"], y)
            task.tutor.update((m.mask * w * l_ut).sum() * scale * n / total_w, at=step, share=total_w / n)
        student.step((m.mask * per_example).sum() * scale)
        loss_sum += float((m.mask * per_example).detach().sum())
    count(selection, w_all)
    if "tutor_tail" in outs[0]:  # mean over the batch's tokens, every rank's
        mass, tokens = distributed.all_sum([sum(o["tutor_tail"][0] for o in outs), sum(o["tutor_tail"][1] for o in outs)])
        record["tutor_tail"] = float(mass) / max(float(tokens), 1.0)
    record["tutor_updated"] = update_tutor
    if update_tutor:
        record["tutor_rate"] = task.tutor.trainee.last_rate
    record["teacher_weight"] = total_w / n
    return loss_sum


def targets(source, batch):
    """A source's targets for ``batch``: float logits, or a language model's sparse targets."""
    t = source.logits(batch)
    return t if sparse_targets(t) else t.float()


def sparse_targets(t) -> bool:
    return isinstance(t, sparse.SparseTargets)


def _losses(task: Task, o: dict) -> dict:
    """Both sources' per-example losses. Like with like: against a sparse cached teacher, the
    (dense, live) tutor is put on the teacher's support first, so that a tutor equal to the
    teacher ties with it instead of winning or losing by the tail's treatment."""
    y = o["m"].batch["labels"]
    o["l_t"] = task.distill(o["z_s"], o["z_t"], y)
    z_u = _on_support(o["z_u"], o["z_t"], task.tau) if sparse_targets(o["z_t"]) else o["z_u"].detach().float()
    o["l_u"] = task.distill(o["z_s"], z_u, y)
    if sparse_targets(z_u):  # the tutor's mass outside the teacher's entries, summed over real tokens
        mask = (y[:, 1:] != -100) & (o["m"].mask[:, None] > 0)
        o["tutor_tail"] = (float(torch.where(mask, z_u.tail.exp(), torch.zeros(())).sum()), float(mask.sum()))
    # what the policy compares: once, in the first pass (a second pass only recomputes the gradients)
    if sparse_targets(o["z_t"]) and not sparse_targets(o["z_u"]) and task.term == "kl" and "sel_t" not in o:
        o["sel_t"], o["sel_u"] = _decision_losses(task, o, z_u)
    return o


def _decision_losses(task: Task, o: dict, z_u: "sparse.SparseTargets") -> tuple[torch.Tensor, torch.Tensor]:
    """What the policy compares when a sparse cached teacher meets a live (dense) tutor under the
    forward KL: each source's loss plus ``α · τ² · p(tail) · KL(u_rest ‖ s_rest)``, the divergence
    inside the teacher's tail that the bins cannot see (:func:`hpc_kd.sparse.tail_kl`). The tutor's
    loss becomes its dense loss (the chain rule of KL); the teacher's is its tail filled in the
    tutor's shape. On the bins alone, a tutor that puts its mass where the teacher has none hides
    its disagreement with the student in one bin and wins by it: on the embedded SmolLM2 the
    sparse decision then went to the tutor at every sequence where the dense one gave a quarter to
    the teacher (``benchmarks/sparse_decisions.py``). Equal tails still tie exactly; the student
    still learns from the training losses ``l_t`` and ``l_u``, this is only what is compared."""
    y = o["m"].batch["labels"]
    mask = y[:, 1:] != -100
    inside = sparse.tail_kl(o["z_s"][:, :-1].detach(), o["z_u"].detach()[:, :-1], o["z_t"], task.tau)
    weight = task.alpha * task.tau * task.tau

    def added(tail: torch.Tensor) -> torch.Tensor:
        return weight * losses.token_mean(tail.exp() * inside, mask)

    return o["l_t"].detach() + added(o["z_t"].tail), o["l_u"].detach() + added(z_u.tail)


def _on_support(z, teacher: "sparse.SparseTargets", tau: float) -> "sparse.SparseTargets":
    """A tutor's targets on the teacher's support: its dense logits [B, T, V] projected (its
    positions predict tokens 1..T−1, as the teacher's targets do) and rounded as the teacher's
    cache rounded its values (float16, log8: the same values for the same distribution, so a tie
    is exact), or its cached sparse targets, which a frozen tutor's cache already holds on the
    teacher's tokens."""
    if sparse_targets(z):
        if not torch.equal(z.ids, teacher.ids):
            raise RuntimeError("the tutor's cached targets are not on the teacher's support")
        return z
    return sparse.stored(sparse.project(z.detach()[:, :-1].float(), teacher, tau), teacher.precision)


def sequence_summary(z, y: torch.Tensor) -> torch.Tensor:
    """What a policy sees of a language model's logits [B, T, V] (or sparse targets), per
    sequence: the share of its predicted tokens whose top-1 is the gold next token, and its mean
    top-1 probability (its confidence); [B, 2]. (Its logits would be B x T x V numbers to gather.)"""
    target = y[:, 1:]
    mask = target != -100
    if sparse_targets(z):
        best, confidence = sparse.top1(z)
    else:
        z = z[:, :-1].detach().float()
        best, confidence = z.argmax(-1), z.softmax(-1).amax(-1)
    right = (best == target).to(torch.float32)
    return torch.stack([losses.token_mean(right, mask), losses.token_mean(confidence, mask)], dim=1)


def select(policy: Policy, outs: list[dict], step: int, total_steps: int, seed: int) -> torch.Tensor:
    """The policy's weights for the whole batch (one per example, in batch order), the same on
    every rank: what it sees is gathered from all of them, rank 0's answer is broadcast."""
    lm = losses.language_model(outs[0]["z_s"])

    def rows(o):
        r = o["m"].real
        y = o["m"].batch["labels"]
        if lm:  # per-sequence summaries stand for the logits; there is no one label
            z = [sequence_summary(o[k], y)[:r] for k in ("z_s", "z_t", "z_u")]
            label = torch.zeros(r, 1)
        else:
            z = [o["z_s"][:r], o["z_t"][:r], o["z_u"][:r].float()]
            label = y[:r, None].to(torch.float32)
        cols = [o.get("sel_t", o["l_t"])[:r, None], o.get("sel_u", o["l_u"])[:r, None], *z, label]
        return torch.cat([c.detach().to(torch.float64).cpu() for c in cols], dim=1)

    table = distributed.gather_rows(torch.cat([rows(o) for o in outs]))
    c = 2 if lm else outs[0]["z_s"].shape[1]
    f32 = table.to(torch.float32)  # exact: every value was a float32 (or a small integer)
    labels = f32[:, -1] if c == 1 else table[:, -1].to(torch.int64)  # a regression's labels are real
    kind = "lm" if lm else "regression" if c == 1 else "classes"
    sel = Selection(f32[:, 0], f32[:, 1], f32[:, 2:2 + c], f32[:, 2 + c:2 + 2 * c], f32[:, 2 + 2 * c:2 + 3 * c],
                    labels, step, total_steps, seed, kind)
    w = policy.select(sel).to(torch.float32).cpu()
    return distributed.broadcast(w)
