import pytest

from hpc_kd.metrics import classification_metrics


def test_values_on_a_constructed_case():
    labels = [0, 0, 0, 1, 1, 1, 1, 1]
    preds = [0, 0, 1, 1, 1, 1, 0, 0]
    m = classification_metrics(labels, preds, 2)
    assert m["confusion"] == [[2, 1], [2, 3]]
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["precision"] == pytest.approx([2 / 4, 3 / 4])
    assert m["recall"] == pytest.approx([2 / 3, 3 / 5])
    f1 = [2 * (0.5 * 2 / 3) / (0.5 + 2 / 3), 2 * (0.75 * 0.6) / (0.75 + 0.6)]
    assert m["f1"] == pytest.approx(f1)
    assert m["macro_f1"] == pytest.approx(sum(f1) / 2)
    assert m["collapsed"] is False and m["classes_predicted"] == 2


def test_collapse_flag_when_one_class_is_predicted():
    m = classification_metrics([0, 1, 1, 0], [1, 1, 1, 1], 2)
    assert m["collapsed"] is True
    assert m["accuracy"] == 0.5
    assert m["precision"] == [0.0, 0.5] and m["recall"] == [0.0, 1.0]
    assert m["macro_f1"] == pytest.approx((0 + 2 * 0.5 / 1.5) / 2)


# -- each GLUE task's metric: golden values, checked against scikit-learn and scipy ------------

import numpy as np  # noqa: E402

from hpc_kd.metrics import SCORES, regression_metrics, resampled_scores, task_metrics  # noqa: E402


def test_matthews_correlation_golden_and_as_scikit_learn_computes_it():
    from sklearn.metrics import matthews_corrcoef

    labels = [0, 0, 0, 1, 1, 1, 1, 1]
    preds = [0, 0, 1, 1, 1, 1, 0, 0]
    m = classification_metrics(labels, preds, 2)
    # (tp·tn − fp·fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) with tp 3, tn 2, fp 1, fn 2
    assert m["mcc"] == pytest.approx((3 * 2 - 1 * 2) / np.sqrt(4 * 5 * 3 * 4))
    assert m["mcc"] == pytest.approx(0.2581988897471611)
    assert m["mcc"] == pytest.approx(matthews_corrcoef(labels, preds))
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 3, 200), rng.integers(0, 3, 200)  # the multi-class form (MNLI's 3 classes)
    assert classification_metrics(y, p, 3)["mcc"] == pytest.approx(matthews_corrcoef(y, p))
    assert classification_metrics([0, 1, 1, 0], [1, 1, 1, 1], 2)["mcc"] == 0.0  # undefined: 0, as scikit-learn


def test_f1_of_the_positive_class_and_the_mrpc_score():
    from sklearn.metrics import accuracy_score, f1_score

    labels = [0, 0, 0, 1, 1, 1, 1, 1]
    preds = [0, 0, 1, 1, 1, 1, 0, 0]
    m = task_metrics(labels, preds, 2, "f1_accuracy")
    assert m["f1_pos"] == pytest.approx(2 * 0.75 * 0.6 / 1.35) == pytest.approx(f1_score(labels, preds))
    assert m["score"] == pytest.approx((f1_score(labels, preds) + accuracy_score(labels, preds)) / 2)
    assert m["score"] == pytest.approx((2 / 3 + 5 / 8) / 2) and m["metric"] == "f1_accuracy"


def test_pearson_and_spearman_golden_and_as_scipy_computes_them():
    from scipy.stats import pearsonr, spearmanr

    labels = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    preds = [0.5, 0.8, 2.5, 2.4, 4.9, 4.0]
    m = task_metrics(labels, preds, 1, "pearson_spearman")
    assert m["spearman"] == pytest.approx(1 - 6 * (1 + 1 + 1 + 1) / (6 * 35))  # two swapped pairs
    assert m["pearson"] == pytest.approx(pearsonr(labels, preds)[0]) and m["spearman"] == pytest.approx(spearmanr(labels, preds)[0])
    assert m["score"] == pytest.approx((m["pearson"] + m["spearman"]) / 2)
    assert m["mse"] == pytest.approx(np.mean((np.array(preds) - labels) ** 2)) and m["collapsed"] is False


def test_a_constant_regression_is_flagged_collapsed_with_zero_correlations():
    m = regression_metrics([0.0, 1.0, 2.0], [2.5, 2.5, 2.5])
    assert m["collapsed"] is True and m["pearson"] == 0.0 and m["spearman"] == 0.0


@pytest.mark.parametrize("metric", list(SCORES))
def test_resampled_scores_equal_the_metric_on_each_resample(metric):
    rng = np.random.default_rng(1)
    if metric in ("pearson", "spearman", "pearson_spearman"):
        labels = rng.normal(size=60).round(1)  # ties, as STS-B's labels have
        preds = labels + rng.normal(size=60)
        num = 1
    else:
        num = 2 if metric in ("f1", "f1_accuracy") else 3
        labels, preds = rng.integers(0, num, 60), rng.integers(0, num, 60)
    idx = rng.integers(0, 60, size=(5, 60))
    got = resampled_scores(metric, labels, preds, idx, num_labels=num)
    want = [task_metrics(labels[i], preds[i], num, metric)["score"] for i in idx]
    assert got == pytest.approx(want)


def test_the_unigram_floor_is_add_one_smoothed_counts():
    """Golden: training tokens [1, 1, 2] over 4 entries: p = (c + 1) / (3 + 4), i.e. 3/7, 2/7,
    1/7 for tokens 1, 2 and the unseen 0 or 3; evaluated on [1, 3]."""
    import math

    from hpc_kd.metrics import unigram_nll

    assert unigram_nll(np.array([1, 1, 2]), np.array([1, 3]), 4) == pytest.approx(-(math.log(3 / 7) + math.log(1 / 7)) / 2)


class _Split:
    """What learnt_tokens reads of an hpc_kd.data.Encoded: tokens, positions(i), len."""

    def __init__(self, tokens, positions):
        self.tokens, self.positions = tokens, positions

    def __len__(self):
        return len(self.tokens)


def test_learnt_tokens_are_the_next_tokens_of_the_learnt_positions():
    from hpc_kd.metrics import learnt_tokens

    tokens = [np.array([5, 6, 7]), np.array([8, 9])]
    document = _Split(tokens, lambda i: np.arange(len(tokens[i]) - 1))  # every position but the last
    chat = _Split(tokens, lambda i: np.array([1]) if i == 0 else np.array([], dtype=np.int64))  # a response's only
    assert learnt_tokens(document).tolist() == [6, 7, 9]
    assert learnt_tokens(chat).tolist() == [7]
