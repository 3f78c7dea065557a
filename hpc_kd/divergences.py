"""The divergence family on log-probabilities: ``D(student ‖ teacher)`` for a student's and a
teacher's log-probabilities over the last dimension (classes, a vocabulary, or a sparse target's
k + 1 bins), one value per position, unscaled. :mod:`hpc_kd.losses` applies them to tempered
softmaxes of logits (the ``*_term`` functions, scaled by τ²), :mod:`hpc_kd.sparse` to sparse
targets' bins; both import this module, which imports nothing of hpc_kd."""
from __future__ import annotations

import math

import torch


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``KL(p ‖ q) = Σ p (log p − log q)`` over the last dimension, with 0 · log 0 = 0."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(dim=-1)


def _mixture(log_p: torch.Tensor, log_q: torch.Tensor, w: float) -> torch.Tensor:
    """``log(w · p + (1 − w) · q)``, computed in log space."""
    if w <= 0:
        return log_q
    if w >= 1:
        return log_p
    return torch.logaddexp(log_p + math.log(w), log_q + math.log(1 - w))


def forward_kl(log_s: torch.Tensor, log_t: torch.Tensor) -> torch.Tensor:
    return _kl(log_t, log_s)


def reverse_kl(log_s: torch.Tensor, log_t: torch.Tensor) -> torch.Tensor:
    return _kl(log_s, log_t)


def jsd(log_s: torch.Tensor, log_t: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    if beta <= 0:
        return forward_kl(log_s, log_t)
    if beta >= 1:
        return reverse_kl(log_s, log_t)
    m = _mixture(log_t, log_s, beta)
    return beta * _kl(log_t, m) + (1 - beta) * _kl(log_s, m)


def skew_kl(log_s: torch.Tensor, log_t: torch.Tensor, lam: float = 0.1) -> torch.Tensor:
    return _kl(log_t, _mixture(log_t, log_s, lam))


def skew_reverse_kl(log_s: torch.Tensor, log_t: torch.Tensor, lam: float = 0.1) -> torch.Tensor:
    return _kl(log_s, _mixture(log_s, log_t, lam))


def tv(log_s: torch.Tensor, log_t: torch.Tensor) -> torch.Tensor:
    return 0.5 * (log_t.exp() - log_s.exp()).abs().sum(dim=-1)


#: the divergences on log-probabilities (student, teacher), unscaled, by ``distill.loss`` name
DIVERGENCES = {"kl": forward_kl, "reverse_kl": reverse_kl, "jsd": jsd, "skew_kl": skew_kl,
               "skew_reverse_kl": skew_reverse_kl, "tv": tv}
