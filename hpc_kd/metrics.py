"""Classification metrics from predictions: accuracy, per-class and macro precision / recall / F1,
the confusion matrix, and the collapse flag (a model that predicts a single class)."""
from __future__ import annotations

import numpy as np


def classification_metrics(labels, preds, num_labels: int) -> dict:
    labels = np.asarray(labels, dtype=np.int64)
    preds = np.asarray(preds, dtype=np.int64)
    if labels.shape != preds.shape or labels.size == 0:
        raise ValueError("labels and predictions must be non-empty and of the same length")
    confusion = np.zeros((num_labels, num_labels), dtype=np.int64)  # rows: true, columns: predicted
    np.add.at(confusion, (labels, preds), 1)
    tp = np.diag(confusion).astype(float)
    predicted = confusion.sum(axis=0).astype(float)
    actual = confusion.sum(axis=1).astype(float)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    classes_predicted = int((predicted > 0).sum())
    return {
        "n": int(labels.size),
        "accuracy": float(tp.sum() / labels.size),
        "precision": precision.tolist(),
        "recall": recall.tolist(),
        "f1": f1.tolist(),
        "macro_precision": float(precision.mean()),
        "macro_recall": float(recall.mean()),
        "macro_f1": float(f1.mean()),
        "confusion": confusion.tolist(),
        "classes_predicted": classes_predicted,
        # The paper's TEID student predicted one class for every sentence: flag it, so it is
        # never read as a merely low accuracy.
        "collapsed": classes_predicted <= 1,
    }
