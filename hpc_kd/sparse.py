"""Sparse teacher targets for large vocabularies, and the divergences against them.

A language model's teacher gives a distribution over its whole vocabulary for every token: dense,
in fp32, 192 KiB per token for a 49,152-token vocabulary. A sparse target keeps, per token, ``k``
token ids with their teacher log-probabilities and the **tail**: the log of the probability mass
of every other token. A cache stores them compactly (:mod:`hpc_kd.cache`; the values at the
precision of :func:`stored`): 114 bytes a token at k = 64 with log8 values.

Two ways to choose the k entries:

- :func:`top_k`: the teacher's k most likely tokens. Their mass is what it is (on the embedded
  SmolLM2 teacher and movie reviews, 66% on average at k = 8, 84% at k = 64), the rest is the tail.
- :func:`sampled`: ``n`` tokens drawn from the teacher's (tempered) distribution, with replacement;
  each distinct token carries its empirical frequency (count / n), and the tail is empty. The
  frequencies are an unbiased estimate of the teacher's probabilities (E[count / n] = p_T), so the
  cross-entropy part of the forward-KL loss, and with it the **forward-KL gradient**, is unbiased
  for the dense one. Nothing else is: the loss's value (the draws' own entropy stands in for the
  teacher's), and the other divergences, which are not linear in p_T (reverse KL and its limits,
  ``jsd`` at β = 1 and ``skew_reverse_kl`` at λ = 0, are even infinite: the config refuses them).
  Nor can a live tutor be compared with draws on their support (its probabilities are another
  estimator: an identical tutor would not tie), so the plan refuses a tutor with sampled targets.
  Top-k is biased toward the head but exact on it.

**How the tail enters every loss** (:func:`divergence`): teacher and student are compared on the
same support, the target's entries plus one tail bin. The student's bins are its probabilities of
the target's tokens (from its full softmax) and, in the tail bin, the mass of every other token;
the teacher's are the stored probabilities and its tail. Any divergence of :data:`hpc_kd.divergences.DIVERGENCES` is
then computed on those bins. This is exact when the entries cover the vocabulary; otherwise it is
the divergence between the two distributions coarse-grained onto the bins, which for every
divergence of the family is at most the dense one (data processing), with equality when the
student's distribution inside the tail is proportional to the teacher's. Renormalising the top k
instead (dropping the tail) would tell the student that the tail has no mass: it biases the student
toward overconfidence. Comparing two sources (a sparse cached teacher and a live tutor) is only
fair on one support: :func:`on_support` puts a dense distribution onto a target's bins. On the bins
alone, though, a tutor whose mass lies where the teacher has little hides its disagreement with
the student in the tail bin and wins by it; under the forward KL a decision therefore also counts,
for both sources, what the bins miss: :func:`tail_kl`, the divergence inside the teacher's tail
(the tutor's shape standing in for the teacher's, the one estimate of it there is).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .divergences import DIVERGENCES


@dataclass(frozen=True)
class SparseTargets:
    """Per position: ``ids`` [..., k] (int64), ``log_probs`` [..., k] (the teacher's
    log-probabilities of those ids; -inf marks a padding entry, e.g. a repeated draw) and ``tail``
    [...] (the log of the mass outside them; -inf for none). ``precision``: how a cache stored
    them (:func:`stored`), so that a live tutor can be put through the same rounding."""

    ids: torch.Tensor
    log_probs: torch.Tensor
    tail: torch.Tensor
    precision: str = "float32"

    @property
    def valid(self) -> torch.Tensor:
        return torch.isfinite(self.log_probs)

    def bins(self) -> torch.Tensor:
        """The teacher's log-probabilities on the k + 1 bins (entries, then the tail)."""
        return torch.cat([self.log_probs, self.tail.unsqueeze(-1)], dim=-1)


def top_k(teacher_logits: torch.Tensor, k: int, tau: float = 1.0) -> SparseTargets:
    """The teacher's k most likely tokens per position, and the log of the rest of its mass."""
    log_p = F.log_softmax(teacher_logits.float() / tau, dim=-1)
    values, ids = log_p.topk(min(k, log_p.shape[-1]), dim=-1)
    return SparseTargets(ids, values, _rest(log_p, ids, torch.ones_like(ids, dtype=torch.bool)))


def sampled(teacher_logits: torch.Tensor, n: int, tau: float = 1.0, generator: torch.Generator | None = None) -> SparseTargets:
    """``n`` draws per position from the teacher's tempered distribution; each distinct token with
    its frequency (count / n) as its probability, the repeats padded out; an empty tail."""
    log_p = F.log_softmax(teacher_logits.float() / tau, dim=-1)
    flat = log_p.reshape(-1, log_p.shape[-1])
    draws = torch.multinomial(flat.exp(), n, replacement=True, generator=generator)  # [P, n]
    draws, _ = draws.sort(dim=-1)
    first = torch.ones_like(draws, dtype=torch.bool)
    first[:, 1:] = draws[:, 1:] != draws[:, :-1]
    counts = torch.zeros(flat.shape, dtype=torch.float32).scatter_add_(1, draws, torch.ones_like(draws, dtype=torch.float32))
    freq = counts.gather(1, draws) / n
    log_probs = torch.where(first, freq.log(), torch.full_like(freq, -torch.inf))
    shape = (*log_p.shape[:-1], n)
    empty = torch.full(log_p.shape[:-1], -torch.inf)
    return SparseTargets(draws.reshape(shape), log_probs.reshape(shape), empty)


def _rest(log_p: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The log of the mass of ``log_p`` [..., V] outside the valid ``ids`` [..., k]: a logsumexp
    over the other tokens (exactly -inf when the ids cover the vocabulary, where ``1 − Σ`` would
    leave a rounding error)."""
    covered = torch.zeros_like(log_p).scatter_add_(-1, ids, valid.to(log_p.dtype)) > 0
    return torch.logsumexp(torch.where(covered, torch.full_like(log_p, -torch.inf), log_p), dim=-1)


def on_support(logits: torch.Tensor, targets: SparseTargets, tau: float = 1.0) -> torch.Tensor:
    """A dense model's tempered log-probabilities on ``targets``' k + 1 bins: its probabilities of
    the target's tokens (padding: -inf) and, in the last bin, the log of the rest of its mass."""
    log_p = F.log_softmax(logits.float() / tau, dim=-1)
    picked = log_p.gather(-1, targets.ids)
    picked = torch.where(targets.valid, picked, torch.full_like(picked, -torch.inf))
    return torch.cat([picked, _rest(log_p, targets.ids, targets.valid).unsqueeze(-1)], dim=-1)


def divergence(name: str, student_logits: torch.Tensor, targets: SparseTargets, tau: float = 1.0, **args) -> torch.Tensor:
    """``τ² · D(student ‖ teacher)`` of :data:`hpc_kd.divergences.DIVERGENCES` on the target's bins (see
    the module docstring), per position: [..., V] logits and [..., k] targets give [...]."""
    if name not in DIVERGENCES:
        raise ValueError(f"{name!r} needs dense logits; sparse targets serve {', '.join(DIVERGENCES)}")
    if name == "kl":  # the default, fused: the same numbers with fewer passes over the vocabulary
        return forward_kl(student_logits, targets, tau)
    return (tau * tau) * DIVERGENCES[name](on_support(student_logits, targets, tau), targets.bins(), **args)


def tail_kl(student_logits: torch.Tensor, tutor_logits: torch.Tensor, targets: SparseTargets, tau: float = 1.0) -> torch.Tensor:
    """Per position, ``KL(u_rest ‖ s_rest)``: how the student's (tempered) distribution differs from
    a dense tutor's inside the teacher's tail, both renormalised over the tokens outside the
    target's entries. The coarse-grained KL on the bins (:func:`divergence`) cannot see it; by the
    chain rule of KL, ``KL(U ‖ S) = KL_bins(U ‖ S) + p_U(tail) · tail_kl``, exactly. A TEID
    decision between a sparse teacher and a live tutor adds ``p(tail) · tail_kl`` to both
    sources' losses (``hpc_kd.step``): the tutor's becomes its dense loss, and the teacher's is its
    tail filled in the tutor's shape, the one estimate of it there is."""
    log_s = F.log_softmax(student_logits.float() / tau, dim=-1)
    log_u = F.log_softmax(tutor_logits.float() / tau, dim=-1)
    covered = torch.zeros_like(log_u).scatter_add_(-1, targets.ids, targets.valid.to(log_u.dtype)) > 0
    rest_u = log_u.masked_fill(covered, -torch.inf)
    rest_u = rest_u - torch.logsumexp(rest_u, dim=-1, keepdim=True)
    rest_s = log_s.masked_fill(covered, -torch.inf)
    rest_s = rest_s - torch.logsumexp(rest_s, dim=-1, keepdim=True)
    terms = rest_u.exp() * (rest_u - rest_s)
    return torch.where(covered | ~torch.isfinite(rest_u), torch.zeros_like(terms), terms).sum(-1)


def forward_kl(student_logits: torch.Tensor, targets: SparseTargets, tau: float = 1.0) -> torch.Tensor:
    """``τ² · KL(teacher ‖ student)`` on the target's bins, per position: what
    ``divergence("kl", ...)`` computed through :func:`on_support` and autograd, with a gradient
    written by hand (:class:`_ForwardKL`): the student's bins from its logits' logsumexp, and as
    the gradient with respect to its tempered logits ``q · P − t``, where ``q`` is its softmax,
    ``P`` the teacher's total mass on the bins (1 up to rounding), ``t_j = p_j`` on the target's
    entries and ``p_tail · q_j / q_rest`` elsewhere. Two passes over the vocabulary where the
    autograd version made about eight (``benchmarks/sparse_loss.py``)."""
    return _fused(student_logits, targets, tau, None, 1.0)


def kd_loss(student_logits: torch.Tensor, targets: SparseTargets, gold: torch.Tensor, tau: float = 1.0,
            alpha: float = 0.5) -> torch.Tensor:
    """Per position, ``α · τ² · KL(teacher ‖ student) + (1 − α) · CE(student, gold)``: the default
    distillation loss of a language model against sparse targets (:func:`forward_kl` and the
    next-token cross-entropy at τ = 1) in one function, sharing the passes over the vocabulary
    (at τ = 1 the softmax too): the cache's KD step then costs little more than the
    cross-entropy alone (``benchmarks/lm_speed.py``)."""
    return _fused(student_logits, targets, tau, gold, alpha)


def _fused(student_logits, targets, tau, gold, alpha):
    shape = student_logits.shape[:-1]
    z = student_logits.reshape(-1, student_logits.shape[-1])
    k = targets.ids.shape[-1]
    ids, log_p, tail = targets.ids.reshape(-1, k), targets.log_probs.reshape(-1, k), targets.tail.reshape(-1)
    gold = None if gold is None else gold.reshape(-1)
    return _ForwardKL.apply(z, ids, log_p, tail, tau, gold, alpha).reshape(shape)


#: below this share of a row's mass on the target's entries, the rest is ``log1p(−share)`` away
#: from the total (no cancellation); above it, it is summed over the other tokens
_REST_BY_SUBTRACTION = 0.5


class _ForwardKL(torch.autograd.Function):
    """:func:`forward_kl` (``gold`` None, ``alpha`` 1) or :func:`kd_loss` on [N, V] logits, [N, k]
    targets and [N] gold ids (the teacher's values carry no gradient).

    The student's mass off the entries (``rest``) is its total times ``1 − Σ q`` over the entries,
    where that sum is below one half; on the other rows (a student sure of the teacher's tokens,
    or entries that cover the vocabulary) it is a logsumexp over the other tokens, which has no
    cancellation: one pass over the vocabulary saved on most rows."""

    @staticmethod
    def forward(ctx, z, ids, log_p, tail, tau, gold, alpha):
        zt = z.float() / tau if tau != 1.0 else z.float()
        valid = torch.isfinite(log_p)
        total = torch.logsumexp(zt, dim=-1)
        # the valid ids set to -inf; a padding entry points at its row's first valid id instead
        first = valid.to(torch.int8).argmax(-1, keepdim=True)
        cover = torch.where(valid, ids, ids.gather(-1, first))
        log_q = torch.where(valid, zt.gather(-1, ids) - total.unsqueeze(-1), torch.full_like(log_p, -torch.inf))
        on_entries = log_q.exp().sum(-1)
        rest = total + torch.log1p(-on_entries.clamp(max=_REST_BY_SUBTRACTION))  # log of the mass off the entries
        exact = (on_entries >= _REST_BY_SUBTRACTION).nonzero(as_tuple=True)[0]
        if len(exact):
            rest[exact] = torch.logsumexp(zt[exact].scatter(-1, cover[exact], -torch.inf), dim=-1)
        log_q_tail = rest - total
        p, p_tail = log_p.exp(), tail.exp()
        loss = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)
        loss = loss + torch.where(p_tail > 0, p_tail * (tail - log_q_tail), torch.zeros_like(p_tail))
        loss = (alpha * tau * tau) * loss
        total1 = None
        if gold is not None:  # the cross-entropy at τ = 1 (the same total when τ is 1)
            z1 = z.float()
            total1 = total if tau == 1.0 else torch.logsumexp(z1, dim=-1)
            loss = loss + (1.0 - alpha) * (total1 - z1.gather(-1, gold.unsqueeze(-1)).squeeze(-1))
        ctx.save_for_backward(z, cover, first, p, p_tail, total, rest, valid, gold, total1)
        ctx.tau, ctx.alpha = tau, alpha
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        z, cover, first, p, p_tail, total, rest, valid, gold, total1 = ctx.saved_tensors
        tau, alpha = ctx.tau, ctx.alpha
        zt = z.float() / tau if tau != 1.0 else z.float()
        q = (zt - total.unsqueeze(-1)).exp_()  # the student's softmax
        mass = p.sum(-1) + p_tail  # the teacher's, on the bins
        # off the entries: q_j · P − p_tail · q_j / q_rest (no mass off them: nothing to share),
        # times α τ; at τ = 1 the cross-entropy's q_j − [j = gold] shares the softmax (its 1 − α)
        a = alpha * tau
        b = (1.0 - alpha) if gold is not None and tau == 1.0 else 0.0
        share = torch.where(p_tail > 0, p_tail * (total - rest).exp(), torch.zeros_like(p_tail))
        q_cover = (zt.gather(-1, cover) - total.unsqueeze(-1)).exp()
        grad = q.mul_((a * (mass - share) + b).unsqueeze(-1))
        # on the entries: q_j · P − p_j (a padding entry repeats its row's first valid entry)
        on = q_cover * (a * mass + b).unsqueeze(-1) - a * torch.where(valid, p, p.gather(-1, first))
        grad.scatter_(-1, cover, on)
        if gold is not None:
            if tau != 1.0:
                grad.add_((z.float() - total1.unsqueeze(-1)).exp_(), alpha=1.0 - alpha)
            grad.scatter_add_(-1, gold.unsqueeze(-1), torch.full_like(total, alpha - 1.0).unsqueeze(-1))
        grad.mul_(grad_out.unsqueeze(-1))
        return grad.to(z.dtype), None, None, None, None, None, None


def project(logits: torch.Tensor, targets: SparseTargets, tau: float = 1.0) -> SparseTargets:
    """A dense model's distribution as sparse targets on ``targets``' support (the same ids and a
    tail of the rest of its mass): how a live tutor is compared with a sparse cached teacher."""
    bins = on_support(logits, targets, tau)
    return SparseTargets(targets.ids, bins[..., :-1], bins[..., -1])


# -- how a cache stores the values (``distill.sparse_precision``) ---------------------------------
#
# float32 as they are; float16 the entries rounded to half precision (the tail in float32); log8
# one byte per value on a log scale: code = round(S · ln(1 + (−log p) / ε)), ε = 0.01, clipped at
# −log p = 20 (code 254; p < 2e-9 is stored as 2e-9) and 255 for -inf (padding, or no tail). A
# code's step is 3% of (ε − log p): 0.35% of p at p = 0.9, 9% at p = 0.05, where it weighs little.
# Read back, log8 bins (entries and tail) are renormalised to sum to exactly 1.
LOG8_EPS, LOG8_TOP, LOG8_PAD = 0.01, 20.0, 255
LOG8_SCALE = (LOG8_PAD - 1) / math.log1p(LOG8_TOP / LOG8_EPS)
PRECISIONS = ("float32", "float16", "log8")


def log8_encode(log_p: torch.Tensor) -> torch.Tensor:
    """Log-probabilities (≤ 0 or -inf) as uint8 codes."""
    x = (-log_p.float()).clamp(0.0, LOG8_TOP)
    code = torch.round(LOG8_SCALE * torch.log1p(x / LOG8_EPS))
    return torch.where(torch.isfinite(log_p), code, torch.full_like(code, LOG8_PAD)).to(torch.uint8)


def log8_decode(code: torch.Tensor) -> torch.Tensor:
    lp = -LOG8_EPS * torch.expm1(code.float() / LOG8_SCALE)
    return torch.where(code == LOG8_PAD, torch.full_like(lp, -torch.inf), lp)


def renormalised(log_probs: torch.Tensor, tail: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Entries and tail shifted so that the bins sum to exactly 1 (rounding left them near 1)."""
    bins = torch.cat([log_probs, tail.unsqueeze(-1)], dim=-1)
    bins = bins - torch.logsumexp(bins, dim=-1, keepdim=True)
    return bins[..., :-1], bins[..., -1]


def decoded(log_probs: torch.Tensor, tail: torch.Tensor, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 entries and tail a cache's stored values (float32, float16 or log8 codes) stand for."""
    if precision == "log8":
        return renormalised(log8_decode(log_probs), log8_decode(tail))
    return log_probs.float(), tail.float()


def encoded(t: SparseTargets, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The values a cache of ``precision`` stores for ``t``: (entries, tail)."""
    if precision == "log8":
        return log8_encode(t.log_probs), log8_encode(t.tail)
    return t.log_probs.to(torch.float16 if precision == "float16" else torch.float32), t.tail.float()


def stored(t: SparseTargets, precision: str) -> SparseTargets:
    """``t`` as a cache of ``precision`` gives it back: a live tutor compared with a cached teacher
    goes through the same rounding, so that a tutor equal to the teacher ties exactly."""
    return SparseTargets(t.ids, *decoded(*encoded(t, precision), precision), precision)


def mix(a: SparseTargets, b: SparseTargets, w: torch.Tensor) -> SparseTargets:
    """``w · a + (1 − w) · b`` of two targets on one support (``w``: one weight per sequence)."""
    w = w.view(-1, *([1] * (a.log_probs.dim() - 1))).to(a.log_probs.dtype)
    lw, l1w = torch.log(w.clamp_min(1e-30)), torch.log((1 - w).clamp_min(1e-30))
    bins = torch.logaddexp(a.bins() + lw, b.bins() + l1w)
    bins = torch.where((w == 1) | (w == 0), torch.where(w == 1, a.bins(), b.bins()), bins)
    return SparseTargets(a.ids, bins[..., :-1], bins[..., -1])


def top1(targets: SparseTargets) -> tuple[torch.Tensor, torch.Tensor]:
    """The most probable stored token per position and its probability."""
    best = targets.log_probs.argmax(-1, keepdim=True)
    return targets.ids.gather(-1, best).squeeze(-1), targets.log_probs.gather(-1, best).squeeze(-1).exp()
