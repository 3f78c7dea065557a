import torch

from hpc_kd.policies import POLICIES, Selection, make_policy


def selection(loss_teacher, loss_tutor):
    lt, lu = torch.tensor(loss_teacher), torch.tensor(loss_tutor)
    z = torch.zeros(len(loss_teacher), 2)
    return Selection(lt, lu, z, z, z, torch.zeros(len(loss_teacher), dtype=torch.long), 0, 10)


def test_registry_names():
    assert list(POLICIES) == ["teacher", "tutor", "min_loss"]
    assert POLICIES["teacher"].teacher_only and not POLICIES["min_loss"].teacher_only


def test_teacher_and_tutor_are_constant():
    sel = selection([5.0, 5.0], [0.1, 0.1])
    assert make_policy("teacher").select(sel).tolist() == [1.0, 1.0]
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
