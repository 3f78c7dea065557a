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


# -- the divergence family (distill.loss), used by every task kind ------------------------------

from hpc_kd import losses  # noqa: E402


def _softmax(row, tau):
    e = [math.exp(v / tau) for v in row]
    return [v / sum(e) for v in e]


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def divergence_reference(name, s, t, tau, param=None):
    """Each term written out in plain Python for one row of logits (τ² included, as documented)."""
    ps, pt = _softmax(s, tau), _softmax(t, tau)
    mix = lambda w, a, b: [w * x + (1 - w) * y for x, y in zip(a, b)]  # noqa: E731
    value = {
        "kl": lambda: _kl(pt, ps),
        "reverse_kl": lambda: _kl(ps, pt),
        "jsd": lambda: param * _kl(pt, mix(param, pt, ps)) + (1 - param) * _kl(ps, mix(param, pt, ps)),
        "skew_kl": lambda: _kl(pt, mix(param, pt, ps)),
        "skew_reverse_kl": lambda: _kl(ps, mix(param, ps, pt)),
        "tv": lambda: 0.5 * sum(abs(a - b) for a, b in zip(pt, ps)),
    }[name]()
    return tau * tau * value


Z3_S = torch.tensor([[1.0, 2.0, -1.0], [0.5, -0.5, 0.0], [0.0, 0.0, 0.0]])
Z3_T = torch.tensor([[2.0, 1.0, 0.0], [1.0, 0.0, -2.0], [3.0, -1.0, 0.5]])
TERMS = [("kl", None), ("reverse_kl", None), ("jsd", 0.5), ("jsd", 0.1), ("skew_kl", 0.1), ("skew_reverse_kl", 0.1),
         ("tv", None)]
ARG = {"jsd": "beta", "skew_kl": "lam", "skew_reverse_kl": "lam"}
# Golden values at τ = 1 and τ = 2, pinned once from the plain-Python formulas above.
DIVERGENCE_GOLDEN = {
    ("kl", None, 1.0): [0.4519493, 0.2434599, 0.7498710],
    ("kl", None, 2.0): [0.4666602, 0.4510717, 1.2176620],
    ("reverse_kl", None, 1.0): [0.4693628, 0.4367323, 1.1637287],
    ("reverse_kl", None, 2.0): [0.4907538, 0.5716493, 1.3466916],
    ("jsd", 0.5, 1.0): [0.1105513, 0.0732429, 0.2014342],
    ("jsd", 0.5, 2.0): [0.1183623, 0.1238787, 0.3080165],
    ("jsd", 0.1, 1.0): [0.0402298, 0.0225765, 0.0676981],
    ("jsd", 0.1, 2.0): [0.0420548, 0.0412590, 0.1092973],
    ("skew_kl", 0.1, 1.0): [0.3587546, 0.2095493, 0.6128422],
    ("skew_kl", 0.1, 2.0): [0.3791385, 0.3775530, 0.9822986],
    ("skew_reverse_kl", 0.1, 1.0): [0.3662485, 0.2803266, 0.7310667],
    ("skew_reverse_kl", 0.1, 2.0): [0.3904975, 0.4326467, 1.0365076],
    ("tv", None, 1.0): [0.4606560, 0.2720769, 0.5754266],
    ("tv", None, 2.0): [0.9574140, 0.8181767, 1.4799226],
}


@pytest.mark.parametrize("name,param", TERMS)
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_divergence_golden_values(name, param, tau):
    kwargs = {ARG[name]: param} if param is not None else {}
    got = losses.DISTILL_TERMS[name](Z3_S, Z3_T, tau, **kwargs).tolist()
    want = [divergence_reference(name, s, t, tau, param) for s, t in zip(Z3_S.tolist(), Z3_T.tolist())]
    assert got == pytest.approx(want, abs=1e-6)
    assert got == pytest.approx(DIVERGENCE_GOLDEN[(name, param, tau)], abs=1e-6)


@pytest.mark.parametrize("name", list(losses.DISTILL_TERMS))
def test_every_term_is_zero_at_the_teacher_and_positive_elsewhere(name):
    assert losses.DISTILL_TERMS[name](Z3_T, Z3_T, 2.0).abs().max() < 1e-6
    assert (losses.DISTILL_TERMS[name](Z3_S, Z3_T, 2.0) > 0).all()


def test_the_ends_of_the_interpolating_terms():
    kl, rkl = losses.kl_term(Z3_S, Z3_T, 1.0), losses.reverse_kl_term(Z3_S, Z3_T, 1.0)
    assert torch.allclose(losses.jsd_term(Z3_S, Z3_T, 1.0, beta=0.0), kl)
    assert torch.allclose(losses.jsd_term(Z3_S, Z3_T, 1.0, beta=1.0), rkl)
    assert torch.allclose(losses.skew_kl_term(Z3_S, Z3_T, 1.0, lam=0.0), kl)
    assert torch.allclose(losses.skew_reverse_kl_term(Z3_S, Z3_T, 1.0, lam=0.0), rkl)
    far = torch.tensor([[30.0, -30.0]]), torch.tensor([[-30.0, 30.0]])
    assert losses.jsd_term(*far, 1.0).item() == pytest.approx(math.log(2), abs=1e-6)  # JSD(0.5) <= log 2
    assert losses.tv_term(*far, 1.0).item() == pytest.approx(1.0, abs=1e-6)


def test_terms_reduce_per_token_and_token_mean_follows_the_padding_mask():
    """A language model's logits [B, T, V]: one value per token, then one per sequence."""
    z_s, z_t = torch.randn(2, 4, 11, generator=torch.Generator().manual_seed(0)), torch.randn(2, 4, 11)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    for name, fn in losses.DISTILL_TERMS.items():
        per_token = fn(z_s, z_t, 1.0)
        assert per_token.shape == (2, 4)
        rows = fn(z_s.reshape(8, 11), z_t.reshape(8, 11), 1.0).reshape(2, 4)  # the same rows, flattened
        assert torch.allclose(per_token, rows)
        per_seq = losses.token_mean(per_token, mask)
        assert per_seq.tolist() == pytest.approx([per_token[0, :3].mean().item(), per_token[1, :2].mean().item()])


def test_term_args_reads_only_the_chosen_terms_keys():
    from hpc_kd.config import DistillConfig

    assert losses.term_args(DistillConfig(loss="kl")) == {}
    assert losses.term_args(DistillConfig(loss="jsd", jsd_beta=0.3)) == {"beta": 0.3}
    assert losses.term_args(DistillConfig(loss="skew_reverse_kl", skew_lambda=0.2)) == {"lam": 0.2}
