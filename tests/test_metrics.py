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
