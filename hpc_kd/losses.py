"""Losses as small pure functions. Each returns one value per example (shape ``[B]``) so that
selection policies can compare sources per example; callers take the mean for a batch.

A model with **one output** is a regression (STS-B; ``num_labels: 1``, as in Hugging Face): its
gold loss is the squared error to the label and its soft term the squared error to the
teacher's prediction, whatever term is named (a softmax over one value is always 1, so a KL on it
would be 0). Everything else is classification over ``z.shape[-1]`` classes.

Golden values in ``tests/test_losses.py`` pin the numbers across refactors.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy(z_s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy ``CE(z_S, y) = -log softmax(z_S)[y]``."""
    return F.cross_entropy(z_s, y, reduction="none")


def squared_error(z_s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example ``(z_S − y)²`` of a one-output (regression) model."""
    return (z_s[:, 0] - y.to(z_s.dtype)) ** 2


def regression(z: torch.Tensor) -> bool:
    """One output per example: a regression model."""
    return z.shape[-1] == 1


def gold_loss(z_s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The loss against the gold labels: cross-entropy, or the squared error for regression."""
    return squared_error(z_s, y) if regression(z_s) else cross_entropy(z_s, y)


def kl_term(z_s: torch.Tensor, z_t: torch.Tensor, tau: float) -> torch.Tensor:
    """Per-example Hinton term ``τ² · KL(softmax(z_T/τ) ‖ softmax(z_S/τ))``.

    The τ² factor keeps the gradient scale of the soft term independent of τ (Hinton et al. 2015).
    """
    log_p_s = F.log_softmax(z_s / tau, dim=-1)
    log_p_t = F.log_softmax(z_t / tau, dim=-1)
    return (tau * tau) * (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1)


def mse_term(z_s: torch.Tensor, z_t: torch.Tensor, tau: float) -> torch.Tensor:
    """Per-example mean squared error between raw logits, ``mean_c (z_S - z_T)²`` (τ is unused)."""
    return ((z_s - z_t) ** 2).mean(dim=-1)


DISTILL_TERMS = {"kl": kl_term, "mse": mse_term}


def distillation_loss(
    z_s: torch.Tensor, z_t: torch.Tensor, y: torch.Tensor, tau: float, alpha: float, term: str = "kl"
) -> torch.Tensor:
    """``DistillationLoss(z_S, z_T, y, τ, α)`` of the TEID paper (Algorithm 1), per example:

        L = α · τ² · KL(softmax(z_T/τ) ‖ softmax(z_S/τ)) + (1 − α) · CE(z_S, y)

    α weighs the soft (teacher) term, 1 − α the hard-label cross-entropy; the paper uses
    τ = 1, α = 0.5. ``term="mse"`` swaps the KL term for an MSE on logits. The teacher logits
    carry no gradient. For regression (one output): ``α · (z_S − z_T)² + (1 − α) · (z_S − y)²``.
    """
    soft = DISTILL_TERMS["mse" if regression(z_s) else term](z_s, z_t.detach(), tau)
    return alpha * soft + (1.0 - alpha) * gold_loss(z_s, y)


def mix_targets(z_t: torch.Tensor, z_u: torch.Tensor, w: torch.Tensor, tau: float, term: str = "kl") -> torch.Tensor:
    """Logits whose tempered softmax is the mixture ``w · softmax(z_T/τ) + (1 − w) · softmax(z_U/τ)``
    (``τ · log`` of it), so that ``distillation_loss`` against them distils the mixture; for the
    ``mse`` term and for regression, the mixture of the outputs themselves. ``w`` has one weight
    per example."""
    w = w.unsqueeze(-1)
    if term == "mse" or regression(z_t):
        return w * z_t + (1 - w) * z_u
    p = w * F.softmax(z_t / tau, dim=-1) + (1 - w) * F.softmax(z_u / tau, dim=-1)
    return tau * torch.log(p.clamp_min(1e-30))
