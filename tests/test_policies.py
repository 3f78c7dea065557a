import math

import pytest
import torch

from hpc_kd.losses import mix_targets
from hpc_kd.policies import POLICIES, RandomPolicy, Selection, make_policy


def selection(loss_teacher, loss_tutor):
    lt, lu = torch.tensor(loss_teacher), torch.tensor(loss_tutor)
    z = torch.zeros(len(loss_teacher), 2)
    return Selection(lt, lu, z, z, z, torch.zeros(len(loss_teacher), dtype=torch.long), 0, 10)


def test_registry_names():
    assert list(POLICIES) == ["teacher", "tutor", "min_loss", "min_loss_sample", "normalized", "correct_first",
                              "random", "anneal", "ensemble", "bandit", "none"]
    assert [name for name, p in POLICIES.items() if not p.needs_tutor] == ["teacher", "none"]
    assert [name for name, p in POLICIES.items() if not p.needs_teacher] == ["none"]
    assert [name for name in POLICIES if make_policy(name).probe] == ["bandit"]


def test_teacher_is_never_asked_and_tutor_is_constant():
    with pytest.raises(NotImplementedError):  # plain KD has no tutor: the step never asks it
        make_policy("teacher").select(selection([5.0, 5.0], [0.1, 0.1]))
    sel = selection([0.1, 0.1], [5.0, 5.0])
    assert make_policy("tutor").select(sel).tolist() == [0.0, 0.0]


def test_min_loss_compares_batch_means():
    policy = make_policy("min_loss")
    # teacher mean 0.5 < tutor mean 0.6, though the tutor wins the first example: whole batch -> teacher
    assert policy.select(selection([0.9, 0.1], [0.2, 1.0])).tolist() == [1.0, 1.0]
    # tutor lower -> whole batch -> tutor
    assert policy.select(selection([0.4, 0.4], [0.3, 0.3])).tolist() == [0.0, 0.0]
    # a tie goes to the tutor, as in the paper's `if L_T < L_U`
    assert policy.select(selection([0.5, 0.5], [0.5, 0.5])).tolist() == [0.0, 0.0]


def sel_full(loss_teacher, loss_tutor, z_teacher=None, z_tutor=None, labels=None, step=0, total=10):
    lt, lu = torch.tensor(loss_teacher), torch.tensor(loss_tutor)
    n = len(loss_teacher)
    z0 = torch.zeros(n, 2)
    return Selection(lt, lu, z0, torch.tensor(z_teacher) if z_teacher else z0, torch.tensor(z_tutor) if z_tutor else z0,
                     torch.tensor(labels) if labels else torch.zeros(n, dtype=torch.long), step, total)


def test_min_loss_sample_decides_per_example():
    w = make_policy("min_loss_sample").select(sel_full([0.9, 0.1, 0.5], [0.2, 1.0, 0.5]))
    assert w.tolist() == [0.0, 1.0, 0.0]


def test_normalized_compares_relative_to_running_means():
    policy = make_policy("normalized", {"momentum": 0.5})
    # the tutor's loss is always 10x smaller: raw min_loss would always pick the tutor
    assert policy.select(sel_full([1.0], [0.1])).tolist() == [0.0]  # first batch: raw comparison
    # means now 1.0 / 0.1; the teacher's loss fell by half, the tutor's did not: teacher wins
    assert policy.select(sel_full([0.5], [0.1])).tolist() == [1.0]
    assert policy.state_dict() == {"mean_teacher": 0.75, "mean_tutor": pytest.approx(0.1)}
    # the tutor improves relatively more: tutor wins
    assert policy.select(sel_full([0.75], [0.02])).tolist() == [0.0]
    fresh = make_policy("normalized", {"momentum": 0.5})
    fresh.load_state_dict(policy.state_dict())
    assert fresh.state_dict() == policy.state_dict()


def test_correct_first():
    # ex0: only the teacher right -> teacher; ex1: only the tutor right -> tutor;
    # ex2: both right -> lower loss (tutor); ex3: both wrong -> lower loss (teacher)
    w = make_policy("correct_first").select(sel_full(
        [0.9, 0.1, 0.5, 0.2], [0.1, 0.9, 0.3, 0.4],
        z_teacher=[[2.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 0.0]],
        z_tutor=[[0.0, 2.0], [0.0, 2.0], [0.0, 2.0], [2.0, 0.0]],
        labels=[0, 1, 1, 1]))
    assert w.tolist() == [1.0, 0.0, 0.0, 1.0]


@pytest.mark.parametrize("shape,expected", [
    ("linear", [0.0, 0.25, 0.5, 1.0]),
    ("cosine", [0.0, 0.14644660940672627, 0.5, 1.0]),
    ("step", [0.0, 0.0, 1.0, 1.0]),
])
def test_anneal_moves_from_tutor_to_teacher(shape, expected):
    policy = make_policy("anneal", {"shape": shape})
    got = [float(policy.select(sel_full([1.0], [1.0], step=s, total=5))[0]) for s in (0, 1, 2, 4)]
    assert got == pytest.approx(expected)


def test_ensemble_weights():
    assert make_policy("ensemble", {"weight": 0.3}).select(sel_full([1.0, 2.0], [1.0, 1.0])).tolist() == pytest.approx([0.3, 0.3])
    w = make_policy("ensemble", {"weight": None}).select(sel_full(
        [1.0], [1.0], z_teacher=[[math.log(9.0), 0.0]], z_tutor=[[0.0, 0.0]]))
    assert w.tolist() == pytest.approx([0.9 / (0.9 + 0.5)])
    assert make_policy("ensemble").mixes_targets


def test_mixed_targets_are_the_mixture_distribution():
    z_t, z_u = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    w = torch.tensor([0.25])
    z = mix_targets(z_t, z_u, w, tau=2.0)
    expected = 0.25 * torch.softmax(z_t / 2, -1) + 0.75 * torch.softmax(z_u / 2, -1)
    assert torch.allclose(torch.softmax(z / 2, -1), expected)


def test_bandit_ucb_tries_both_then_follows_the_reward():
    policy = make_policy("bandit", {"c": 0.0, "probe": 8})
    assert policy.probe == 8
    sel = sel_full([1.0], [1.0])
    assert policy.select(sel).tolist() == [1.0]   # teacher tried first
    policy.feedback(0.5)
    assert policy.select(sel).tolist() == [0.0]   # then the tutor
    policy.feedback(-0.1)
    assert policy.select(sel).tolist() == [1.0]   # c = 0: pure exploitation of the better mean
    policy.feedback(0.4)
    assert policy.state_dict() == {"counts": [2, 1], "sums": [0.9, -0.1], "abs_sum": pytest.approx(1.0), "last": 0}
    explorer = make_policy("bandit", {"c": 100.0, "probe": 8})
    explorer.load_state_dict({"counts": [10, 1], "sums": [5.0, 0.0], "abs_sum": 5.0, "last": 0})
    assert explorer.select(sel).tolist() == [0.0]  # a large bonus explores the rarely tried arm


def test_normalized_first_batch_compares_raw_losses():
    """Before any running mean exists the rule is the paper's: the lower raw loss wins."""
    assert make_policy("normalized").select(sel_full([0.2, 0.2], [0.9, 0.9])).tolist() == [1.0, 1.0]
    assert make_policy("normalized").select(sel_full([0.9], [0.2])).tolist() == [0.0]


def test_random_draws_per_batch_from_seed_and_step_only():
    policy = make_policy("random", {"teacher_prob": 0.3})
    draws = [policy.select(sel_full([0.1, 5.0], [5.0, 0.1], step=s)).tolist() for s in range(2000)]
    assert all(d in ([1.0, 1.0], [0.0, 0.0]) for d in draws)  # a whole batch, whatever the losses
    share = sum(d[0] for d in draws) / len(draws)
    assert abs(share - 0.3) < 0.035  # 3.4 standard deviations of a binomial(2000, 0.3) share
    # a pure function of (seed, step): a resumed run, another rank or another instance draws the same
    again = make_policy("random", {"teacher_prob": 0.3})
    assert [again.select(sel_full([0.0], [0.0], step=s)).tolist()[0] for s in range(2000)] == [d[0] for d in draws]
    other_seed = [RandomPolicy(0.3).teacher_wins(1, s) for s in range(200)]
    assert other_seed != [d[0] == 1.0 for d in draws[:200]]
    assert not any(RandomPolicy(0.0).teacher_wins(0, s) for s in range(200))
    assert all(RandomPolicy(1.0).teacher_wins(0, s) for s in range(200))
    assert policy.state_dict() == {}
