import math

import pytest
import torch

from hpc_kd.losses import cross_entropy, distillation_loss, kl_term, mse_term

Z_S = torch.tensor([[1.0, 2.0], [0.5, -0.5], [0.0, 0.0]])
Z_T = torch.tensor([[2.0, 1.0], [1.0, 0.0], [3.0, -1.0]])
Y = torch.tensor([1, 0, 1])


def reference(z_s, z_t, y, tau, alpha):
    """The formula written out in plain Python, independent of the implementation."""
    out = []
    for s, t, label in zip(z_s.tolist(), z_t.tolist(), y.tolist()):
        ps = [math.exp(v / tau) / sum(math.exp(u / tau) for u in s) for v in s]
        pt = [math.exp(v / tau) / sum(math.exp(u / tau) for u in t) for v in t]
        kl = sum(a * math.log(a / b) for a, b in zip(pt, ps))
        ce = -math.log(math.exp(s[label]) / sum(math.exp(u) for u in s))
        out.append(alpha * tau * tau * kl + (1 - alpha) * ce)
    return out


# Golden values: pinned once from the formula; a refactor that changes them is a behaviour change.
GOLDEN = {
    (1.0, 0.5): [0.3876894224, 0.1566308438, 0.6480997967],
    (2.0, 0.5): [0.4015495062, 0.1566308438, 1.0022002412],
    (4.0, 0.9): [0.4789969751, 0.0313261688, 1.6669093501],
}


@pytest.mark.parametrize("tau,alpha", list(GOLDEN))
def test_distillation_loss_golden(tau, alpha):
    got = distillation_loss(Z_S, Z_T, Y, tau, alpha).tolist()
    assert got == pytest.approx(GOLDEN[(tau, alpha)], abs=1e-6)
    assert got == pytest.approx(reference(Z_S, Z_T, Y, tau, alpha), abs=1e-6)


def test_alpha_extremes():
    assert distillation_loss(Z_S, Z_T, Y, 2.0, 0.0).tolist() == pytest.approx(cross_entropy(Z_S, Y).tolist())
    assert distillation_loss(Z_S, Z_T, Y, 2.0, 1.0).tolist() == pytest.approx((kl_term(Z_S, Z_T, 2.0)).tolist())


def test_kl_zero_for_identical_logits_and_teacher_gets_no_gradient():
    assert kl_term(Z_T, Z_T, 3.0).abs().max().item() < 1e-7
    z_s, z_t = Z_S.clone().requires_grad_(), Z_T.clone().requires_grad_()
    distillation_loss(z_s, z_t, Y, 2.0, 0.5).sum().backward()
    assert z_t.grad is None and z_s.grad is not None


def test_mse_term():
    assert mse_term(Z_S, Z_T, 1.0).tolist() == pytest.approx([1.0, 0.25, 5.0])
