"""Sparse teacher targets (top-k and sampled) against the dense losses, on a small vocabulary."""
import pytest
import torch

from hpc_kd import losses, sparse

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
    as_tutor = losses.DIVERGENCES["kl"](sparse.on_support(Z_S, targets), tutor_bins)
    assert torch.allclose(as_teacher, as_tutor, atol=1e-6)
    assert not torch.allclose(dense("kl"), as_teacher)  # while the dense loss would differ


def test_mse_needs_dense_logits():
    with pytest.raises(ValueError, match="needs dense logits"):
        sparse.divergence("mse", Z_S, sparse.top_k(Z_T, 4))
