"""Sparse teacher targets (top-k and sampled) against the dense losses, on a small vocabulary."""
import pytest
import torch

from hpc_kd import divergences, losses, sparse

V = 40
GEN = torch.Generator().manual_seed(0)
Z_T = 2.0 * torch.randn(3, 5, V, generator=GEN)  # [batch, tokens, vocabulary]
Z_S = 2.0 * torch.randn(3, 5, V, generator=GEN)
TERMS = ["kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tv"]


def dense(name, z_s=Z_S, z_t=Z_T, tau=1.0):
    return losses.DISTILL_TERMS[name](z_s, z_t, tau)


@pytest.mark.parametrize("name", TERMS)
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_top_k_over_the_whole_vocabulary_is_the_dense_loss(name, tau):
    targets = sparse.top_k(Z_T, V, tau)
    assert torch.allclose(sparse.divergence(name, Z_S, targets, tau), dense(name, tau=tau), atol=1e-5)


@pytest.mark.parametrize("name", TERMS)
def test_a_smaller_k_never_exceeds_the_dense_loss_and_grows_toward_it(name):
    """Coarse-graining onto k + 1 bins loses information (data processing): the sparse divergence
    is a lower bound of the dense one, closer as k grows."""
    values = [sparse.divergence(name, Z_S, sparse.top_k(Z_T, k)) for k in (2, 8, 32, V)]
    for small, big in zip(values, values[1:]):
        assert (small <= big + 1e-5).all()
    assert torch.allclose(values[-1], dense(name), atol=1e-5)


def test_the_tail_holds_the_mass_outside_the_top_k():
    targets = sparse.top_k(Z_T, 8)
    mass = targets.log_probs.exp().sum(-1) + targets.tail.exp()
    assert torch.allclose(mass, torch.ones_like(mass), atol=1e-5)
    assert targets.ids.shape == (3, 5, 8) and targets.tail.shape == (3, 5)


def test_a_student_proportional_to_the_teacher_in_the_tail_loses_nothing():
    """Equality case: inside the tail the student's distribution is the teacher's, rescaled."""
    k = 6
    targets = sparse.top_k(Z_T, k)
    head = torch.zeros_like(Z_T, dtype=torch.bool).scatter_(-1, targets.ids, True)
    z_s = torch.where(head, Z_S, Z_T + 0.7)  # tail logits = teacher's + a constant
    assert torch.allclose(sparse.divergence("kl", z_s, targets), dense("kl", z_s=z_s), atol=1e-5)


def test_renormalising_the_top_k_would_differ_from_keeping_the_tail():
    """Dropping the tail (renormalising the top k) is another, biased target: the student is told
    the other tokens have no mass."""
    targets = sparse.top_k(Z_T, 4)
    renormalised = sparse.SparseTargets(targets.ids, targets.log_probs - torch.logsumexp(targets.log_probs, -1, keepdim=True),
                                        torch.full_like(targets.tail, -torch.inf))
    kept = sparse.divergence("kl", Z_S, targets)
    dropped = sparse.divergence("kl", Z_S, renormalised)
    assert (dropped > kept + 1e-3).all()  # here it overstates the head, so the loss is larger everywhere


def test_sampled_targets_are_unbiased_for_the_forward_kl_cross_entropy():
    """Frequencies of n draws estimate p_T without bias: the cross-entropy Σ p̂ · (−log p_S), over
    many draws, averages to the dense Σ p_T · (−log p_S)."""
    log_s = torch.log_softmax(Z_S, -1)
    dense_ce = -(torch.softmax(Z_T, -1) * log_s).sum(-1)
    gen = torch.Generator().manual_seed(1)
    estimates = []
    for _ in range(200):
        t = sparse.sampled(Z_T, 16, generator=gen)
        weights = torch.where(t.valid, t.log_probs.exp(), torch.zeros_like(t.log_probs))
        estimates.append(-(weights * log_s.gather(-1, t.ids)).sum(-1))
        assert torch.allclose(weights.sum(-1), torch.ones(3, 5)) and (t.tail == -torch.inf).all()
    mean = torch.stack(estimates).mean(0)
    assert torch.allclose(mean, dense_ce, rtol=0.05)  # 200 x 16 draws per token: within 5%


def test_a_tutor_identical_to_the_teacher_ties_on_the_same_support():
    """Compare like with like: a dense tutor equal to the teacher, put on the teacher's sparse
    support, gives the student exactly the teacher's loss, so a policy sees a tie."""
    targets = sparse.top_k(Z_T, 8)
    as_teacher = sparse.divergence("kl", Z_S, targets)
    tutor_bins = sparse.on_support(Z_T.clone(), targets)  # the tutor = the teacher, dense
    as_tutor = divergences.DIVERGENCES["kl"](sparse.on_support(Z_S, targets), tutor_bins)
    assert torch.allclose(as_teacher, as_tutor, atol=1e-6)
    assert not torch.allclose(dense("kl"), as_teacher)  # while the dense loss would differ


def test_mse_needs_dense_logits():
    with pytest.raises(ValueError, match="needs dense logits"):
        sparse.divergence("mse", Z_S, sparse.top_k(Z_T, 4))


# -- what a cache stores (distill.sparse_precision) and ties under every precision (issue 19) ------

@pytest.mark.parametrize("precision", ["float32", "float16", "log8"])
@pytest.mark.parametrize("name", TERMS)
def test_a_tutor_identical_to_the_teacher_ties_exactly_under_every_precision(precision, name):
    """The cached teacher's values went through the cache's rounding; the live tutor, put on the
    teacher's support, goes through the same (hpc_kd.step._on_support), so an identical tutor gives
    the student exactly the teacher's loss, not a win or loss decided by rounding."""
    teacher = sparse.stored(sparse.top_k(Z_T, 8), precision)
    tutor = sparse.stored(sparse.project(Z_T.clone(), teacher), precision)
    assert torch.equal(tutor.log_probs, teacher.log_probs) and torch.equal(tutor.tail, teacher.tail)
    assert torch.equal(sparse.divergence(name, Z_S, teacher), sparse.divergence(name, Z_S, tutor))


def test_float16_without_the_tutors_rounding_would_not_tie():
    """Why the tutor is rounded too: float16 entries sum to 1 only up to about 3e-4, enough for an
    unrounded identical tutor to win or lose the comparison at random."""
    teacher = sparse.stored(sparse.top_k(Z_T, 8), "float16")
    tutor = sparse.project(Z_T.clone(), teacher)
    assert not torch.equal(sparse.divergence("kl", Z_S, teacher), sparse.divergence("kl", Z_S, tutor))


def test_log8_codes_golden_and_renormalised():
    """log8: code = round(S · ln(1 + (−log p) / 0.01)), S = 254 / ln(2001); 255 is -inf."""
    lp = torch.tensor([0.0, -0.01, -0.105, -1.0, -7.0, -20.0, -40.0, -torch.inf])
    codes = sparse.log8_encode(lp)
    assert codes.tolist() == [0, 23, 82, 154, 219, 254, 254, 255]
    back = sparse.log8_decode(codes)
    finite = lp > -20
    assert ((back[finite] - lp[finite]).abs() <= 0.016 * (0.01 - lp[finite])).all()  # half a 3% step
    assert back[-1] == -torch.inf and back[-2] == back[-3]  # below e^-20 is stored as e^-20
    t = sparse.stored(sparse.top_k(Z_T, 8), "log8")
    mass = t.log_probs.exp().sum(-1) + t.tail.exp()
    assert torch.allclose(mass, torch.ones_like(mass), atol=1e-6)


@pytest.mark.parametrize("precision", ["float32", "float16", "log8"])
def test_the_compact_layout_round_trips(precision):
    """ids sorted and delta-coded in uint16 (uint32 past 65,536 tokens), values at the precision:
    what the reader gets back is :func:`hpc_kd.sparse.stored` of what was written, entries in id order."""
    import numpy as np

    from hpc_kd.cache import SPARSE_PARQUET, sparse_columns, sparse_table

    for vocab, offset in ((V, 0), (70_000, 65_000)):
        t = sparse.top_k(Z_T, 8).ids.reshape(-1, 8) + offset, sparse.top_k(Z_T, 8)
        ids, ref = t[0], t[1]
        flat = sparse.SparseTargets(ids, ref.log_probs.reshape(-1, 8), ref.tail.reshape(-1))
        table = sparse_table(np.repeat(np.arange(3), 5), flat, precision, vocab)
        assert table.schema.field("ids").type.byte_width == 8 * (2 if vocab <= 65536 else 4)
        got_ids, got_lp, got_tail = sparse_columns(table, {"k": 8, "precision": precision})
        order = ids.argsort(dim=-1, stable=True)
        want = sparse.stored(sparse.SparseTargets(ids.gather(-1, order), flat.log_probs.gather(-1, order), flat.tail), precision)
        assert torch.equal(got_ids, want.ids) and torch.equal(got_lp, want.log_probs) and torch.equal(got_tail, want.tail)


def test_sampled_targets_would_not_tie_an_identical_tutor():
    """Why the plan refuses a tutor with sampled targets (tests/test_lm.py): the teacher's draw
    frequencies and the identical tutor's probabilities on the drawn tokens are two estimators of
    one distribution, and the loss against them differs by far more than rounding."""
    teacher = sparse.sampled(Z_T, 64, generator=torch.Generator().manual_seed(0))
    tutor = sparse.project(Z_T.clone(), teacher)
    gap = sparse.divergence("kl", Z_S, teacher) - sparse.divergence("kl", Z_S, tutor)
    assert gap.abs().mean() > 0.1


@pytest.mark.parametrize("kind", ["top_k", "sampled", "whole_vocabulary", "no_tail"])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_the_fused_forward_kl_is_the_autograd_one(kind, tau):
    """sparse.forward_kl (the default divergence's hand-written gradient) against the same loss
    through on_support and autograd: values and gradients, with padding entries (sampled), a
    target covering the vocabulary, and an empty tail."""
    gen = torch.Generator().manual_seed(3)
    z_t = torch.randn(2, 5, 40, generator=gen) * 3
    if kind == "no_tail":  # the top 6 renormalised: no mass off the entries
        top = sparse.top_k(z_t, 6, tau)
        t = sparse.SparseTargets(top.ids, *sparse.renormalised(top.log_probs, torch.full((2, 5), -torch.inf)))
    else:
        t = {"top_k": lambda: sparse.top_k(z_t, 6, tau), "whole_vocabulary": lambda: sparse.top_k(z_t, 40, tau),
             "sampled": lambda: sparse.sampled(z_t, 12, tau, torch.Generator().manual_seed(4))}[kind]()
    assert kind != "sampled" or (~t.valid).any()  # repeats padded out
    a = (torch.randn(2, 5, 40, generator=gen) * 2).requires_grad_(True)
    b = a.detach().clone().requires_grad_(True)
    weights = torch.rand(2, 5, generator=gen)
    reference = (tau * tau) * divergences.DIVERGENCES["kl"](sparse.on_support(a, t, tau), t.bins())
    fused = sparse.forward_kl(b, t, tau)
    (reference * weights).sum().backward()
    (fused * weights).sum().backward()
    assert torch.allclose(fused, reference, atol=1e-5, rtol=1e-5)
    assert torch.allclose(b.grad, a.grad, atol=1e-6)
    assert sparse.divergence("kl", b.detach(), t, tau).equal(fused.detach())


@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("sure", [False, True])
@pytest.mark.parametrize("kind", ["top_k", "sampled"])
def test_the_fused_kd_loss_is_the_kl_plus_the_cross_entropy(kind, sure, tau):
    """sparse.kd_loss (one function for both terms of a language model's default loss) against
    α · forward_kl + (1 − α) · cross-entropy, in value and gradient: with a student that puts
    little of its mass on the teacher's entries (its rest by subtraction) and one sure of them
    (its rest summed over the other tokens), with padding entries (sampled), at τ = 1 (one
    softmax shared) and 2."""
    gen = torch.Generator().manual_seed(5)
    z_t = torch.randn(2, 5, 40, generator=gen) * 3
    t = sparse.top_k(z_t, 6, tau) if kind == "top_k" else sparse.sampled(z_t, 12, tau, torch.Generator().manual_seed(6))
    z_s = torch.randn(2, 5, 40, generator=gen) * 2
    if sure:  # most of the student's (tempered) mass on the teacher's entries
        z_s = z_s.scatter_add(-1, t.ids, torch.where(t.valid, torch.full(t.ids.shape, 12.0 * tau), torch.zeros(t.ids.shape)))
    q = torch.softmax(z_s / tau, -1)
    on_entries = torch.zeros_like(q).scatter(-1, t.ids, 1.0).mul(q).sum(-1)
    assert bool((on_entries > 0.5).all()) if sure else bool((on_entries < 0.5).all())
    gold = torch.randint(0, 40, (2, 5), generator=gen)
    a = z_s.clone().requires_grad_(True)
    b = z_s.clone().requires_grad_(True)
    weights = torch.rand(2, 5, generator=gen)
    alpha = 0.3
    reference = alpha * (tau * tau) * divergences.DIVERGENCES["kl"](sparse.on_support(a, t, tau), t.bins()) \
        + (1 - alpha) * torch.nn.functional.cross_entropy(a.reshape(-1, 40), gold.reshape(-1), reduction="none").view(2, 5)
    fused = sparse.kd_loss(b, t, gold, tau, alpha)
    (reference * weights).sum().backward()
    (fused * weights).sum().backward()
    assert torch.allclose(fused, reference, atol=1e-5, rtol=1e-5)
    assert torch.allclose(b.grad, a.grad, atol=1e-6)
    assert torch.allclose(sparse.kd_loss(b.detach(), t, gold, tau, 1.0), sparse.forward_kl(b.detach(), t, tau))


def test_a_language_models_default_loss_is_alpha_kl_plus_one_minus_alpha_ce():
    """losses.distillation_loss on sparse targets with the forward KL (fused) gives, per sequence,
    what the two terms give apart, and ignores padded positions."""
    gen = torch.Generator().manual_seed(7)
    z_s, z_t = torch.randn(3, 6, 40, generator=gen), torch.randn(3, 6, 40, generator=gen) * 3
    y = torch.randint(0, 40, (3, 6), generator=gen)
    y[0, 4:] = -100
    targets = sparse.top_k(z_t[:, :-1], 6)
    fused = losses.distillation_loss(z_s, targets, y, 1.0, 0.4)
    soft = losses.token_mean(losses._sparse_per_token("kl", z_s, targets, y, 1.0, None), y[:, 1:] != -100)
    assert torch.allclose(fused, 0.4 * soft + 0.6 * losses.gold_loss(z_s, y), atol=1e-6)


# -- what a TEID decision compares against a sparse teacher (sparse.tail_kl, step._decision_losses) --

@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_the_tail_divergence_completes_the_bins_to_the_dense_kl(tau):
    """The chain rule of KL: on a target's bins plus its tail mass times the divergence inside the
    tail, a dense tutor's loss is its dense loss exactly."""
    z_u = 2.0 * torch.randn(3, 5, V, generator=GEN)
    targets = sparse.top_k(Z_T, 8, tau)
    tutor = sparse.project(z_u, targets, tau)
    completed = sparse.divergence("kl", Z_S, tutor, tau) + tau * tau * tutor.tail.exp() * sparse.tail_kl(Z_S, z_u, targets, tau)
    assert torch.allclose(completed, dense("kl", z_t=z_u, tau=tau), atol=1e-5)
    full = sparse.top_k(Z_T, V, tau)  # no tail: nothing inside it
    assert torch.equal(sparse.tail_kl(Z_S, z_u, full, tau), torch.zeros(3, 5))


def _decision(z_t: "sparse.SparseTargets", z_u: torch.Tensor, z_s: torch.Tensor, alpha: float = 0.5):
    """The per-sequence losses a policy compares (``hpc_kd.step._losses``), for logits [B, T, V]
    whose first T − 1 positions the teacher's targets cover."""
    from hpc_kd.step import Micro, Task, _losses

    labels = torch.randint(0, V, z_s.shape[:2], generator=GEN)
    batch = {"labels": labels, "input_ids": labels, "attention_mask": torch.ones_like(labels)}
    o = _losses(Task(None, None, None, tau=1.0, alpha=alpha, term="kl"),
                {"m": Micro(batch, torch.ones(len(z_s)), 0, len(z_s)), "z_s": z_s, "z_t": z_t, "z_u": z_u})
    return o


@pytest.mark.parametrize("precision", ["float32", "float16", "log8"])
def test_an_identical_tutor_still_ties_in_the_decision(precision):
    z_t = torch.cat([Z_T, Z_T[:, :1]], dim=1)  # [3, 6, V]: positions 0..4 are the teacher's targets
    z_s = torch.cat([Z_S, Z_S[:, :1]], dim=1)
    o = _decision(sparse.stored(sparse.top_k(Z_T, 8), precision), z_t.clone(), z_s)
    assert torch.equal(o["sel_t"], o["sel_u"]) and (o["sel_t"] > o["l_t"]).all()


def test_the_decision_sees_a_tutor_that_disagrees_with_the_student_inside_the_teachers_tail():
    """A tutor that puts its mass where the teacher has little, spread unlike the student: on the
    bins alone its disagreement with the student is one tail bin and it wins; with the divergence
    inside the tail (its dense loss against the teacher's tail filled in its shape) the decision
    is the dense one."""
    z_t = torch.cat([Z_T, Z_T[:, :1]], dim=1)
    z_s = torch.cat([Z_S, Z_S[:, :1]], dim=1)
    targets = sparse.stored(sparse.top_k(Z_T, 8), "log8")
    outside = torch.ones(3, 6, V, dtype=torch.bool).scatter_(-1, torch.cat([targets.ids, targets.ids[:, :1]], 1), False)
    z_u = torch.where(outside, 3.0 - 2.0 * z_s, z_t)  # the tail of the tutor: heavy, and opposite to the student
    o = _decision(targets, z_u, z_s, alpha=1.0)
    dense_t = losses.token_mean(dense("kl", z_s=Z_S, z_t=Z_T), torch.ones(3, 5))
    dense_u = losses.token_mean(dense("kl", z_s=Z_S, z_t=z_u[:, :-1]), torch.ones(3, 5))
    assert (dense_t < dense_u).all()  # dense: the teacher is closer to the student
    assert (o["l_t"] > o["l_u"]).all()  # on the bins alone the tutor would win every sequence
    assert (o["sel_t"] < o["sel_u"]).all()  # the decision is the dense one
    assert torch.allclose(o["sel_u"], dense_u, atol=2e-2)  # the tutor's: its dense loss (up to log8)
