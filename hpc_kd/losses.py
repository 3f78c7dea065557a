"""Losses as small pure functions. Each returns one value per example (shape ``[B]``) so that
selection policies can compare sources per example; callers take the mean for a batch.

A model whose logits have a **time axis** ([B, T, V]) is a language model: position t predicts
token t + 1, the labels are the tokens with -100 on padding, and every loss is computed per token
and reduced per sequence by :func:`token_mean` over the predicted (unpadded) tokens, so a policy
compares sources on one value per sequence, as it does per example for a classifier.

A model with **one output** is a regression (STS-B; ``num_labels: 1``, as in Hugging Face): its
gold loss is the squared error to the label and its soft term the squared error to the
teacher's prediction, whatever term is named (a softmax over one value is always 1, so a KL on it
would be 0). Everything else is classification over ``z.shape[-1]`` classes.

Golden values in ``tests/test_losses.py`` pin the numbers across refactors.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import sparse
from .divergences import DIVERGENCES


def cross_entropy(z_s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy ``CE(z_S, y) = -log softmax(z_S)[y]``."""
    return F.cross_entropy(z_s, y, reduction="none")


def squared_error(z_s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example ``(z_S − y)²`` of a one-output (regression) model."""
    return (z_s[:, 0] - y.to(z_s.dtype)) ** 2


def regression(z: torch.Tensor) -> bool:
    """One output per example: a regression model."""
    return z.shape[-1] == 1


def language_model(z: torch.Tensor) -> bool:
    """Logits with a time axis [B, T, V]: a language model."""
    return z.dim() == 3


def next_token_cross_entropy(z_s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A language model's per-sequence loss: the mean over its predicted tokens of
    ``−log softmax(z_S[t])[y[t + 1]]`` (labels -100 are ignored)."""
    z, target = z_s[:, :-1], y[:, 1:]
    per_token = F.cross_entropy(z.reshape(-1, z.shape[-1]).float(), target.reshape(-1), reduction="none",
                                ignore_index=-100).view(target.shape)
    return token_mean(per_token, target != -100)


def gold_loss(z_s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The loss against the gold labels: cross-entropy, the squared error for regression, the
    next-token cross-entropy (per sequence) for a language model."""
    if language_model(z_s):
        return next_token_cross_entropy(z_s, y)
    return squared_error(z_s, y) if regression(z_s) else cross_entropy(z_s, y)


def _log_probs(z: torch.Tensor, tau: float) -> torch.Tensor:
    return F.log_softmax(z.float() / tau, dim=-1)


# The divergence family (``distill.loss``). Every term takes student and teacher logits of shape
# [..., V] (V classes, or a vocabulary) and returns one value per position, shape [...]: the
# divergence is summed over the last dimension, nothing else is reduced. A classifier's batch
# [B, C] gives one value per example; a language model's [B, T, V] one per token, which
# :func:`token_mean` reduces to one per sequence under the padding mask; a batch's loss is the mean
# over examples (the trainer's). Distributions are ``softmax(z / τ)``; every term but ``mse`` is
# scaled by τ² (Hinton's factor, which keeps the gradient's size independent of τ), and all are 0
# when the student equals the teacher. p_T is the teacher's distribution, p_S the student's.


def _term(name: str, z_s: torch.Tensor, z_t: torch.Tensor, tau: float, **args) -> torch.Tensor:
    return (tau * tau) * DIVERGENCES[name](_log_probs(z_s, tau), _log_probs(z_t, tau), **args)


def kl_term(z_s: torch.Tensor, z_t: torch.Tensor, tau: float) -> torch.Tensor:
    """Forward KL, Hinton's KD: ``τ² · KL(p_T ‖ p_S)``. Mass-covering: the student is pushed to
    put probability wherever the teacher does."""
    return _term("kl", z_s, z_t, tau)


def reverse_kl_term(z_s: torch.Tensor, z_t: torch.Tensor, tau: float) -> torch.Tensor:
    """Reverse KL (MiniLLM, Gu et al. 2024): ``τ² · KL(p_S ‖ p_T)``. Mode-seeking: the student is
    not pushed onto the teacher's low-probability tail."""
    return _term("reverse_kl", z_s, z_t, tau)


def jsd_term(z_s: torch.Tensor, z_t: torch.Tensor, tau: float, beta: float = 0.5) -> torch.Tensor:
    """Generalised Jensen–Shannon divergence (GKD, Agarwal et al. 2024), as TRL computes it: with
    the mixture ``M = β · p_T + (1 − β) · p_S``, ``τ² · (β · KL(p_T ‖ M) + (1 − β) · KL(p_S ‖ M))``.
    β = 0.5 is the symmetric JSD (bounded by log 2). The ends, where the mixture formula vanishes,
    are the divergences it interpolates between: β = 0 is forward KL, β = 1 reverse KL."""
    return _term("jsd", z_s, z_t, tau, beta=beta)


def skew_kl_term(z_s: torch.Tensor, z_t: torch.Tensor, tau: float, lam: float = 0.1) -> torch.Tensor:
    """Skew KL (DistiLLM, Ko et al. 2024): ``τ² · KL(p_T ‖ λ · p_T + (1 − λ) · p_S)``. Mixing a
    little of the teacher into the student's side keeps the divergence finite and its gradient
    stable where the student gives a teacher token almost no mass; λ = 0 is forward KL."""
    return _term("skew_kl", z_s, z_t, tau, lam=lam)


def skew_reverse_kl_term(z_s: torch.Tensor, z_t: torch.Tensor, tau: float, lam: float = 0.1) -> torch.Tensor:
    """Skew reverse KL (DistiLLM): ``τ² · KL(p_S ‖ λ · p_S + (1 − λ) · p_T)``; λ = 0 is reverse KL."""
    return _term("skew_reverse_kl", z_s, z_t, tau, lam=lam)


def tv_term(z_s: torch.Tensor, z_t: torch.Tensor, tau: float) -> torch.Tensor:
    """Total variation distance: ``τ² · ½ Σ |p_T − p_S|`` (in [0, τ²]); a bounded, symmetric
    distance whose gradient does not grow with the log-ratio."""
    return _term("tv", z_s, z_t, tau)


def mse_term(z_s: torch.Tensor, z_t: torch.Tensor, tau: float) -> torch.Tensor:
    """Mean squared error between raw logits, ``mean_c (z_S − z_T)²`` (τ is unused)."""
    return ((z_s.float() - z_t.float()) ** 2).mean(dim=-1)


def token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token values [B, T] -> one per sequence [B]: the mean over the positions where ``mask``
    is 1 (a sequence without any is 0). Every sequence weighs the same in a batch whatever its
    length; a policy compares sources on these token means."""
    keep = mask.bool()
    return torch.where(keep, values, torch.zeros_like(values)).sum(dim=-1) / keep.sum(dim=-1).clamp_min(1)


DISTILL_TERMS = {"kl": kl_term, "reverse_kl": reverse_kl_term, "jsd": jsd_term, "skew_kl": skew_kl_term,
                 "skew_reverse_kl": skew_reverse_kl_term, "tv": tv_term, "mse": mse_term}
#: each term's parameters: term argument -> the ``distill`` config key that sets it (only the chosen
#: term's keys enter a stage's signature)
TERM_PARAMS = {"jsd": {"beta": "jsd_beta"}, "skew_kl": {"lam": "skew_lambda"},
               "skew_reverse_kl": {"lam": "skew_lambda"}}


def term_args(distill) -> dict:
    """The parameters of ``distill.loss``, from their config keys (empty for a term without any)."""
    return {arg: getattr(distill, key) for arg, key in TERM_PARAMS.get(distill.loss, {}).items()}


def distillation_loss(
    z_s: torch.Tensor, z_t: torch.Tensor, y: torch.Tensor, tau: float, alpha: float, term: str = "kl",
    args: dict | None = None,
) -> torch.Tensor:
    """``DistillationLoss(z_S, z_T, y, τ, α)`` of the TEID paper (Algorithm 1), per example:

        L = α · τ² · KL(softmax(z_T/τ) ‖ softmax(z_S/τ)) + (1 − α) · CE(z_S, y)

    α weighs the soft (teacher) term, 1 − α the hard-label cross-entropy; the paper uses
    τ = 1, α = 0.5. ``term="mse"`` swaps the KL term for an MSE on logits. The teacher logits
    carry no gradient. For regression (one output): ``α · (z_S − z_T)² + (1 − α) · (z_S − y)²``.
    ``term`` names any of :data:`DISTILL_TERMS` (``args``: its parameters, e.g. ``{"beta": 0.5}``).
    """
    if isinstance(z_t, sparse.SparseTargets):  # a language model's sparse targets [B, T − 1, k]
        if term == "kl":  # the default: the two terms in one pass over the vocabulary
            return token_mean(_sparse_per_token(term, z_s, z_t, y, tau, args, alpha), y[:, 1:] != -100)
        soft = token_mean(_sparse_per_token(term, z_s, z_t, y, tau, args), y[:, 1:] != -100)
    elif language_model(z_s):  # per token, then the mean over each sequence's predicted tokens
        per_token = DISTILL_TERMS[term](z_s[:, :-1], z_t[:, :-1].detach(), tau, **(args or {}))
        soft = token_mean(per_token, y[:, 1:] != -100)
    elif regression(z_s):
        soft = mse_term(z_s, z_t.detach(), tau)
    else:
        soft = DISTILL_TERMS[term](z_s, z_t.detach(), tau, **(args or {}))
    return alpha * soft + (1.0 - alpha) * gold_loss(z_s, y)


def _sparse_per_token(term: str, z_s: torch.Tensor, targets, y: torch.Tensor, tau: float, args,
                      alpha: float | None = None) -> torch.Tensor:
    """The divergence against sparse targets at the predicted (unpadded) tokens only, 0 elsewhere
    (padding positions hold no distribution, and are never computed). With ``alpha`` (the forward
    KL only): the whole per-token loss, ``α`` times it plus ``1 − α`` times the next-token
    cross-entropy (:func:`hpc_kd.sparse.kd_loss`)."""
    mask = y[:, 1:] != -100
    at = mask.nonzero(as_tuple=True)
    picked = sparse.SparseTargets(targets.ids[at], targets.log_probs[at], targets.tail[at])
    out = torch.zeros(mask.shape, dtype=torch.float32, device=z_s.device)
    if alpha is not None:
        out[at] = sparse.kd_loss(z_s[:, :-1][at], picked, y[:, 1:][at], tau, alpha)
    else:
        out[at] = sparse.divergence(term, z_s[:, :-1][at], picked, tau, **(args or {}))
    return out


def mix_targets(z_t: torch.Tensor, z_u: torch.Tensor, w: torch.Tensor, tau: float, term: str = "kl") -> torch.Tensor:
    """Logits whose tempered softmax is the mixture ``w · softmax(z_T/τ) + (1 − w) · softmax(z_U/τ)``
    (``τ · log`` of it), so that ``distillation_loss`` against them distils the mixture; for the
    ``mse`` term and for regression, the mixture of the outputs themselves. ``w`` has one weight
    per example."""
    w = w.view(-1, *([1] * (z_t.dim() - 1)))  # one weight per example (a sequence: all its tokens)
    if term == "mse" or regression(z_t):
        return w * z_t + (1 - w) * z_u
    p = w * F.softmax(z_t / tau, dim=-1) + (1 - w) * F.softmax(z_u / tau, dim=-1)
    return tau * torch.log(p.clamp_min(1e-30))
