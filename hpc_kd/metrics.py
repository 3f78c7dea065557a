"""Metrics from predictions, and each task's headline ``score``.

Classification: accuracy, per-class and macro precision / recall / F1, F1 of class 1 (binary
tasks: MRPC, QQP), Matthews correlation (CoLA; the multi-class form, as scikit-learn computes it),
the confusion matrix and the collapse flag (a model that predicts a single class). Regression
(STS-B): Pearson and Spearman correlation (scipy), mean squared error, and its collapse flag (a
model whose predictions are constant). Golden values, checked against scikit-learn and scipy, are
in ``tests/test_metrics.py``.

:data:`SCORES` turns a metrics dict into the one number a task is judged by (``data.metric``):
it picks the best epoch, stops early and heads the tables.
"""
from __future__ import annotations

import numpy as np

SCORES = {
    "accuracy": lambda m: m["accuracy"],
    "macro_f1": lambda m: m["macro_f1"],
    "f1": lambda m: m["f1_pos"],
    "mcc": lambda m: m["mcc"],
    "f1_accuracy": lambda m: (m["f1_pos"] + m["accuracy"]) / 2,
    "pearson": lambda m: m["pearson"],
    "spearman": lambda m: m["spearman"],
    "pearson_spearman": lambda m: (m["pearson"] + m["spearman"]) / 2,
}


def task_metrics(labels, preds, num_labels: int, metric: str = "accuracy") -> dict:
    """Every metric of the task kind, plus ``metric`` (its name) and ``score`` (its value)."""
    out = regression_metrics(labels, preds) if num_labels == 1 else classification_metrics(labels, preds, num_labels)
    out["metric"] = metric
    out["score"] = float(SCORES[metric](out))
    return out


def _check(labels, preds) -> None:
    if labels.shape != preds.shape or labels.size == 0:
        raise ValueError("labels and predictions must be non-empty and of the same length")


def confusion_scores(confusion: np.ndarray) -> dict:
    """Scores of confusion matrices [..., k, k] (rows true, columns predicted), over any leading
    dimensions (one matrix, or one per bootstrap resample): accuracy, per-class precision, recall
    and F1 [..., k] (0 where undefined), and Matthews correlation in its multi-class form
    (Gorodkin 2004; 0 when undefined: one row or column only)."""
    c = np.asarray(confusion, dtype=float)
    n = c.sum(axis=(-2, -1))
    tp = np.diagonal(c, axis1=-2, axis2=-1)
    predicted, actual = c.sum(axis=-2), c.sum(axis=-1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=precision + recall > 0)
    cov = tp.sum(axis=-1) * n - (predicted * actual).sum(axis=-1)
    den = np.sqrt((n * n - (predicted ** 2).sum(axis=-1)) * (n * n - (actual ** 2).sum(axis=-1)))
    mcc = np.divide(cov, den, out=np.zeros_like(cov), where=den > 0)
    return {"accuracy": tp.sum(axis=-1) / n, "precision": precision, "recall": recall, "f1": f1, "mcc": mcc}


def classification_metrics(labels, preds, num_labels: int) -> dict:
    labels = np.asarray(labels, dtype=np.int64)
    preds = np.asarray(preds, dtype=np.int64)
    _check(labels, preds)
    confusion = np.zeros((num_labels, num_labels), dtype=np.int64)  # rows: true, columns: predicted
    np.add.at(confusion, (labels, preds), 1)
    scores = confusion_scores(confusion)
    precision, recall, f1 = scores["precision"], scores["recall"], scores["f1"]
    classes_predicted = int((confusion.sum(axis=0) > 0).sum())
    out = {
        "n": int(labels.size),
        "accuracy": float(scores["accuracy"]),
        "precision": precision.tolist(),
        "recall": recall.tolist(),
        "f1": f1.tolist(),
        "macro_precision": float(precision.mean()),
        "macro_recall": float(recall.mean()),
        "macro_f1": float(f1.mean()),
        "mcc": float(scores["mcc"]),
        "confusion": confusion.tolist(),
        "classes_predicted": classes_predicted,
        # The paper's TEID student predicted one class for every sentence: flag it, so it is
        # never read as a merely low accuracy.
        "collapsed": classes_predicted <= 1,
    }
    if num_labels == 2:
        out["f1_pos"] = float(f1[1])  # GLUE's F1 (MRPC, QQP): of the positive class
    return out


def regression_metrics(labels, preds) -> dict:
    """Pearson and Spearman correlation (0 when a side is constant, where they are undefined),
    MSE, and ``collapsed``: the predictions are constant (to 1e-6 of the labels' spread)."""
    from scipy.stats import pearsonr, spearmanr

    labels = np.asarray(labels, dtype=np.float64)
    preds = np.asarray(preds, dtype=np.float64)
    _check(labels, preds)
    collapsed = bool(np.std(preds) <= 1e-6 * np.std(labels))
    undefined = collapsed or labels.size < 2 or np.std(labels) == 0
    return {
        "n": int(labels.size),
        "pearson": 0.0 if undefined else float(pearsonr(labels, preds)[0]),
        "spearman": 0.0 if undefined else float(spearmanr(labels, preds)[0]),
        "mse": float(np.mean((preds - labels) ** 2)),
        "collapsed": collapsed,
    }


def resampled_scores(metric: str, labels, preds, idx: np.ndarray, num_labels: int | None = None) -> np.ndarray:
    """``metric``'s score on each bootstrap resample: row ``b`` of ``idx`` picks the examples of
    resample ``b``. Vectorised over resamples (the paired bootstrap runs thousands); equal to
    :func:`task_metrics`' score on each resample (a test checks it)."""
    y = np.asarray(labels)[idx]
    p = np.asarray(preds)[idx]
    if metric in ("pearson", "spearman", "pearson_spearman"):
        def corr(a, b):
            a = a - a.mean(axis=1, keepdims=True)
            b = b - b.mean(axis=1, keepdims=True)
            den = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
            return np.divide((a * b).sum(axis=1), den, out=np.zeros(len(a)), where=den > 0)

        from scipy.stats import rankdata

        pearson = corr(y, p) if metric != "spearman" else 0.0
        spearman = corr(rankdata(y, axis=1), rankdata(p, axis=1)) if metric != "pearson" else 0.0
        return {"pearson": pearson, "spearman": spearman, "pearson_spearman": (pearson + spearman) / 2}[metric]
    y, p = y.astype(np.int64), p.astype(np.int64)
    k = num_labels or int(max(np.max(labels), np.max(preds))) + 1
    # one confusion matrix per resample [B, true, predicted], by counting (true, predicted) codes
    codes = y * k + p + (k * k) * np.arange(len(y))[:, None]
    confusion = np.bincount(codes.ravel(), minlength=len(y) * k * k).reshape(len(y), k, k)
    scores = confusion_scores(confusion)
    if metric in ("accuracy", "mcc"):
        return scores[metric]
    if metric == "macro_f1":
        return scores["f1"].mean(axis=1)
    f1_pos = scores["f1"][:, 1]
    return f1_pos if metric == "f1" else (f1_pos + scores["accuracy"]) / 2


#: a language model is degenerate when one token is its top-1 at this share of the positions or more
DEGENERATE_SHARE = 0.9
#: the repetition criterion of the degenerate flag: the n-gram size and the share of repeated ones
REPEAT_N, DEGENERATE_REPEAT = 4, 0.5


def learnt_tokens(encoded) -> np.ndarray:
    """Every learnt next token of a language model's split (an ``hpc_kd.data.Encoded``): the token
    after each position whose next token is learnt, all sequences in order."""
    parts = [np.asarray(encoded.tokens[i])[encoded.positions(i) + 1] for i in range(len(encoded))]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def unigram_nll(train: np.ndarray, evaluated: np.ndarray, vocab: int) -> float:
    """The floor any language model must beat: the token NLL on ``evaluated`` tokens of a unigram
    model counted on ``train`` tokens, add-one smoothed over ``vocab`` entries,
    ``p(w) = (c(w) + 1) / (N + V)``; total NLL / total tokens, like ``token_nll``."""
    counts = np.bincount(np.asarray(train, dtype=np.int64), minlength=vocab).astype(np.float64)
    log_p = np.log(counts + 1.0) - np.log(counts.sum() + vocab)
    evaluated = np.asarray(evaluated, dtype=np.int64)
    return float(-log_p[evaluated].sum() / max(len(evaluated), 1))


def lm_metrics(nll, tokens, right, top1_counts) -> dict:
    """A language model's metrics from per-sequence sums: ``nll`` (summed next-token negative
    log-likelihood), ``tokens`` (predicted tokens), ``right`` (tokens whose top-1 was the gold next
    token), and ``top1_counts`` (how often each vocabulary entry was the top-1, over all positions).

    token_nll: total NLL / total tokens (so long sequences weigh more, as in perplexity);
    perplexity: exp(token_nll); top1_accuracy; ``degenerate`` (the LM's collapse flag): one token is
    the top-1 at ≥ 90% of the positions, the analogue of a classifier predicting one class (a
    model repeating one token, or one that learnt only the most frequent token); ``collapsed`` is
    the same flag, for the tables. ``score`` = −token_nll (higher is better, like every score)."""
    import math

    nll, tokens, right = (np.asarray(v, dtype=np.float64) for v in (nll, tokens, right))
    counts = np.asarray(top1_counts, dtype=np.float64)
    total = max(tokens.sum(), 1.0)
    token_nll = float(nll.sum() / total)
    share = float(counts.max() / total) if counts.size and counts.sum() else 0.0
    return {"n": int(len(nll)), "tokens": int(tokens.sum()), "token_nll": token_nll,
            "perplexity": float(math.exp(min(token_nll, 700.0))), "top1_accuracy": float(right.sum() / total),
            "top_token": int(counts.argmax()) if counts.size else None, "top_token_share": share,
            "degenerate": share >= DEGENERATE_SHARE, "collapsed": share >= DEGENERATE_SHARE,
            "metric": "token_nll", "score": -token_nll}


def repetition(sequences, n: int = REPEAT_N) -> float:
    """The share of repeated n-grams in token sequences (seq-rep-n of Welleck et al. 2020, "Neural
    text degeneration with unlikelihood training", pooled): 1 − distinct n-grams / n-grams, each
    sequence's n-grams counted apart. ", , , , ," and "the the the" give nearly 1, fluent text
    near 0; 0 when no sequence has n tokens."""
    total = distinct = 0
    for seq in sequences:
        grams = [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]
        total += len(grams)
        distinct += len(set(grams))
    return 1.0 - distinct / total if total else 0.0


def with_repetition(metrics: dict, share: float) -> dict:
    """An LM split's metrics with the repetition criterion of its greedy continuations
    (``share``: :func:`repetition`): ``degenerate`` (and ``collapsed``) also when at least
    :data:`DEGENERATE_REPEAT` of their n-grams repeat, the model stuck in a loop such as
    ", , , ," or "the the the" (whose top token may be the top-1 at only 19% of positions)."""
    looping = share >= DEGENERATE_REPEAT
    flag = bool(metrics["degenerate"]) or looping
    return {**metrics, "repeated_ngram_share": share, "degenerate": flag, "collapsed": flag}
