"""Statistics and plots over a sweep's rows (pure functions of the run folders).

The headline split is **test** where every finished student has a labelled test split (the
embedded data has one), else **validation**, which also picked each run's best epoch and
stopped it: the tables say so in their header. Validation stays beside the test numbers.

Every number is the task's metric (``data.metric``, the ``score`` of
:func:`hpc_kd.metrics.task_metrics`: accuracy unless the task says otherwise, e.g. Matthews
correlation for CoLA, the mean of Pearson and Spearman for STS-B).

- ``summary``: per (task, depth, iteration and chain, policy, tutor mode, other axes) over seeds:
  n, mean ± std of the headline score and macro-F1 and of the validation score, collapsed runs,
  mean teacher share.
- ``paired_vs_kd``: each policy against plain KD (policy ``teacher``) at the same task, depth,
  iteration, chain and seed: the mean paired difference in the headline score with two 95%
  intervals, a t interval over seeds and a paired bootstrap that resamples both sentences of the
  headline split and seeds (the metric recomputed on every resample). ``paired_vs_baseline``:
  the same against the student trained without a teacher (policy ``none``), where a sweep has one.
- ``cross_task``: for a sweep over several tasks (``grid: {data.name: [...]}``), one table with a
  column per task (MNLI matched and mismatched apart, a combined metric's parts apart) and the
  average over tasks, as papers print it (named for what it is: "GLUE dev average over N tasks").
- ``write_report``: ``summary.md`` and PNG plots under ``plots/``.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from .metrics import resampled_scores
from .rundir import SweepDir, write_atomic

GROUP_OMIT = ("seed", "val_acc", "val_macro_f1", "test_acc", "test_macro_f1", "teacher_share", "teacher_batches",
              "collapsed", "params", "state", "run", "role", "metric", "test_nll", "val_nll", "val_ppl", "agreement",
              "test_choice_acc", "val_choice_acc", "test_nll_start",
              *(f"{split}_{part}" for split in ("val", "test") for part in ("f1", "pearson", "spearman")))
SPLIT_KEY = {"test": "test", "validation": "val"}


def _t975(df: int) -> float:
    """The two-sided 95% quantile of Student's t with ``df`` degrees of freedom (exact)."""
    from scipy.stats import t

    return float(t.ppf(0.975, df))


def headline_split(rows: list[dict]) -> str:
    """``test`` when every finished student has test numbers, else ``validation``."""
    done = students_done(rows)
    return "test" if done and all(r.get("test_score") is not None for r in done) else "validation"


#: the columns every summary line leads with; any other column of a group key is a further grid
#: axis (e.g. ``student.config``) and gets a lead column of its own
LEAD_KEYS = ("task", "depth", "iteration", "chain", "policy", "tutor_update")


def _hashable(value):
    """A grid axis's value as part of a group key: a mapping or list (``student.config``) as its
    canonical JSON, so that two architectures never share a group."""
    return json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else value


def _group_key(row: dict) -> tuple:
    return tuple(sorted((k, _hashable(v)) for k, v in row.items() if k not in GROUP_OMIT and not k.endswith("_score")
                        and k != "damage"))


def _axes(key: tuple) -> list[str]:
    """The further grid axes of a group key (beyond :data:`LEAD_KEYS`)."""
    return [k for k, _ in key if k not in LEAD_KEYS]


def _axis_cell(value) -> str:
    """A further axis's value in a summary line: a mapping as ``key=value`` pairs."""
    if isinstance(value, str) and value.startswith("{"):
        return ", ".join(f"{k}={v}" for k, v in json.loads(value).items())
    return "–" if value is None else str(value)


def plain_kd(row: dict) -> bool:
    """A student of plain KD: the plan resolved its tutor mode to ``none`` (no tutor; recorded
    in sweep.json as ``tutor_update: null``) and it has a teacher, which is what the paired
    differences compare to."""
    return row.get("tutor_update") is None and not no_teacher(row)


def no_teacher(row: dict) -> bool:
    """A student trained without a teacher (policy ``none``: the gold loss alone)."""
    return row.get("policy") == "none"


def students_done(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["role"] == "student" and r["state"] == "done"]


def summary(rows: list[dict], split: str | None = None) -> list[dict]:
    """Per group over seeds; ``score_*`` (the task's metric) and ``f1_*`` (macro-F1, classes only)
    on ``split`` (default: the headline split), ``val_*`` (the score) on validation."""
    split = split or headline_split(rows)
    k = SPLIT_KEY[split]
    groups = defaultdict(dict)
    for row in rows:
        if row["role"] == "student":  # one run may serve several cells (plain KD: every tutor mode)
            groups[_group_key(row)][row["run"]] = row
    # a group none of whose runs has finished has no metric of its own: its task's
    task_metric = {r.get("task"): r["metric"] for r in rows if r.get("metric")}
    out = []
    for key, by_run in groups.items():
        members = list(by_run.values())
        done = [m for m in members if m["state"] == "done"]
        score = np.array([m[f"{k}_score"] for m in done], dtype=float)
        f1 = np.array([m[f"{k}_macro_f1"] for m in done if m.get(f"{k}_macro_f1") is not None], dtype=float)
        choice = np.array([m[f"{k}_choice_acc"] for m in done if m.get(f"{k}_choice_acc") is not None], dtype=float)
        val = np.array([m["val_score"] for m in done], dtype=float)
        shares = [m["teacher_share"] for m in done if m["teacher_share"] is not None]
        out.append({**dict(key), "axes": _axes(key), "n": len(done), "of": len(members), "split": split,
                    "metric": next((m["metric"] for m in members if m.get("metric")),
                                   task_metric.get(members[0].get("task"), "accuracy")),
                    "score_mean": float(score.mean()) if len(score) else None,
                    "score_std": float(score.std(ddof=1)) if len(score) > 1 else None,
                    "f1_mean": float(f1.mean()) if len(f1) else None,
                    "f1_std": float(f1.std(ddof=1)) if len(f1) > 1 else None,
                    "choice_mean": float(choice.mean()) if len(choice) else None,
                    "choice_std": float(choice.std(ddof=1)) if len(choice) > 1 else None,
                    "val_mean": float(val.mean()) if len(val) else None,
                    "val_std": float(val.std(ddof=1)) if len(val) > 1 else None,
                    "collapsed": sum(bool(m["collapsed"]) for m in done),
                    "teacher_share": float(np.mean(shares)) if shares else None})
    return sorted(out, key=_order)


def _order(r: dict) -> tuple:
    return (r.get("iteration") or 0, -(r.get("depth") or 0), str(r.get("chain")), str(r.get("tutor_update")),
            str(r.get("policy")))


def _per_example(root: Path, run: str, split: str, metric: str) -> np.ndarray | None:
    """What the bootstrap resamples for one run: 0/1 per example for accuracy, else predictions
    (absent in older results: None)."""
    res = SweepDir(root).run(run).result()[split]
    values = res.get({"accuracy": "correct", "token_nll": "nll"}.get(metric, "pred"))
    return None if values is None else np.asarray(values, dtype=float)


def paired_vs_kd(root: Path, rows: list[dict], n_boot: int = 4000, seed: int = 0, split: str | None = None) -> list[dict]:
    """Differences in the task's score on ``split`` (default: the headline split) against plain KD,
    paired by task, depth, iteration, chain, other axes and seed."""
    return paired_differences(root, rows, plain_kd, n_boot, seed, split)


def paired_vs_baseline(root: Path, rows: list[dict], n_boot: int = 4000, seed: int = 0,
                       split: str | None = None) -> list[dict]:
    """As :func:`paired_vs_kd`, against the student trained without a teacher (policy ``none``)."""
    return paired_differences(root, rows, no_teacher, n_boot, seed, split)


def paired_differences(root: Path, rows: list[dict], reference, n_boot: int = 4000, seed: int = 0,
                       split: str | None = None) -> list[dict]:
    """Differences in the task's score on ``split`` (default: the headline split) of every other
    student against the students for which ``reference(row)`` holds, paired by task, depth,
    iteration, chain, other axes and seed."""
    split = split or headline_split(rows)
    k = SPLIT_KEY[split]
    done = students_done(rows)
    baseline = {}
    for r in done:
        if reference(r):
            base_key = tuple((k, v) for k, v in _group_key(r) if k not in ("policy", "tutor_update"))
            baseline[(base_key, r["seed"])] = r
    groups = defaultdict(list)
    for r in done:
        if not reference(r):
            groups[_group_key(r)].append(r)
    rng = np.random.default_rng(seed)
    out = []
    for key, members in groups.items():
        base_key = tuple((k, v) for k, v in key if k not in ("policy", "tutor_update"))
        pairs = [(m, baseline[(base_key, m["seed"])]) for m in members if (base_key, m["seed"]) in baseline]
        if not pairs:
            continue
        diffs = np.array([m[f"{k}_score"] - b[f"{k}_score"] for m, b in pairs])
        n = len(diffs)
        mean = float(diffs.mean())
        row = {**dict(key), "axes": _axes(key), "n": n, "split": split, "metric": pairs[0][0].get("metric") or "accuracy", "diff": mean,
               "t_low": None, "t_high": None}
        if n > 1:
            half = _t975(n - 1) * diffs.std(ddof=1) / math.sqrt(n)
            row["t_low"], row["t_high"] = mean - half, mean + half
        # paired bootstrap: resample sentences (same ones for both models) and seeds
        metric = pairs[0][0].get("metric") or "accuracy"
        per_example = [(_per_example(root, m["run"], split, metric), _per_example(root, b["run"], split, metric))
                       for m, b in pairs]
        row["boot_low"] = row["boot_high"] = None
        if any(a is None or c is None for a, c in per_example):
            out.append(row)
            continue
        size = len(per_example[0][0])
        idx = rng.integers(0, size, size=(n_boot, size))
        if metric == "accuracy":  # the mean of 0/1 differences, resampled
            d = np.stack([a - c for a, c in per_example])  # [seeds, sentences]
            per_seed = d[:, idx].mean(axis=2)  # [seeds, boot]
        elif metric == "token_nll":  # −(Σ NLL / Σ tokens) over the resampled sequences
            tokens = np.asarray(SweepDir(root).run(pairs[0][0]["run"]).result()[split]["tokens"], dtype=float)
            per_seed = np.stack([(c[idx].sum(1) - a[idx].sum(1)) / tokens[idx].sum(1) for a, c in per_example])
        else:  # the metric itself, recomputed on each resample of each seed's pair
            labels = np.asarray(SweepDir(root).run(pairs[0][0]["run"]).result()[split]["labels"], dtype=float)
            per_seed = np.stack([resampled_scores(metric, labels, a, idx) - resampled_scores(metric, labels, c, idx)
                                 for a, c in per_example])
        pick = rng.integers(0, n, size=(n_boot, n))
        boot = per_seed[pick, np.arange(n_boot)[:, None]].mean(axis=1)
        row["boot_low"], row["boot_high"] = (float(x) for x in np.percentile(boot, [2.5, 97.5]))
        out.append(row)
    return sorted(out, key=_order)


def _value(metric: str, x, signed=False) -> str:
    """A score as the table shows it: a percentage, or for a language model the token NLL itself
    (the score is −NLL), to 3 decimals."""
    if metric != "token_nll" or x is None:
        return _pct(x, signed)
    return f"{-x + 0.0:+.3f}" if signed else f"{-x + 0.0:.3f}"  # + 0.0: no "-0.000"


def _spread(metric: str, x) -> str:
    return _pct(x) if metric != "token_nll" or x is None else f"{x:.3f}"


def _interval(metric: str, low, high) -> str:
    if low is None:
        return "–"
    if metric == "token_nll":  # an NLL interval is the score's, negated and swapped
        low, high = high, low
    return f"[{_value(metric, low, True)}, {_value(metric, high, True)}]"


def _pct(x, signed=False) -> str:
    if x is None:
        return "–"
    return f"{100 * x:+.2f}" if signed else f"{100 * x:.2f}"


SPLIT_NOTE = {"test": "test split (validation picked each run's best epoch; it is shown beside)",
              "validation": "validation split: no labelled test split, and validation also picked each "
                            "run's best epoch and stopped it, so these numbers are optimistic"}


METRIC_NAMES = {"token_nll": "token NLL", "accuracy": "accuracy", "macro_f1": "macro-F1", "f1": "F1", "mcc": "Matthews corr.",
                "f1_accuracy": "mean of F1 and accuracy", "pearson": "Pearson", "spearman": "Spearman",
                "pearson_spearman": "mean of Pearson and Spearman"}


def metric_label(rows: list[dict]) -> str:
    """What the score columns hold: the metric's name when every row shares it, else "score"
    (each task's own metric; the ``task`` column says which)."""
    metrics = {r.get("metric") or "accuracy" for r in rows}
    return METRIC_NAMES[metrics.pop()] if len(metrics) == 1 else "score"


def summary_markdown(summ: list[dict], paired: list[dict], vs_baseline: list[dict] = ()) -> str:
    split = (summ or paired or [{"split": "validation"}])[0]["split"]
    chained = any((r.get("iteration") or 1) > 1 for r in summ)
    tasks = any(r.get("task") for r in summ)
    label = metric_label(summ)
    axes = list(dict.fromkeys(a for r in summ + paired for a in r.get("axes", ())))
    lead_cols = ["task"] * tasks + ["depth"] + axes + ["chain"] * chained + ["policy", "tutor"]
    head = "| " + " | ".join(lead_cols) + " |"
    sep = "|" + "---|" * len(lead_cols)

    def lead(r):
        cells = [*([str(r.get("task"))] if tasks else []), str(r.get("depth")), *(_axis_cell(r.get(a)) for a in axes),
                 *([str(r.get("chain"))] if chained else []), str(r.get("policy")), str(r.get("tutor_update") or "–")]
        return "| " + " | ".join(cells) + " |"

    with_f1 = any(r["f1_mean"] is not None for r in summ)
    with_choice = any(r.get("choice_mean") is not None for r in summ)
    lm = all(r.get("metric") == "token_nll" for r in summ + paired) and bool(summ)
    units = "mean ± std; lower is better" if lm else "%, mean ± std"
    lines = [f"Headline numbers on the {SPLIT_NOTE[split]}.", "",
             f"### {split.capitalize()} {label} over seeds ({units})", "",
             head + f" n | {split} {label} |" + (f" {split} macro-F1 |" if with_f1 else "")
             + (f" {split} choice accuracy (%) |" if with_choice else "")
             + (f" validation {label} |" if split == "test" else "") + " teacher share | collapsed |",
             sep + "---|---|" + ("---|" if with_f1 else "") + ("---|" if with_choice else "")
             + ("---|" if split == "test" else "") + "---|---|"]
    for r in summ:
        m = r.get("metric") or "accuracy"
        score = f"{_value(m, r['score_mean'])} ± {_spread(m, r['score_std'])}" if r["score_mean"] is not None else "–"
        f1 = (f" {_pct(r['f1_mean'])} ± {_pct(r['f1_std'])} |" if r["f1_mean"] is not None else " – |") if with_f1 else ""
        f1 += (f" {_pct(r['choice_mean'])} ± {_pct(r['choice_std'])} |" if r.get("choice_mean") is not None
               else " – |") if with_choice else ""
        val = ((f" {_value(m, r['val_mean'])} ± {_spread(m, r['val_std'])} |" if r["val_mean"] is not None else " – |")
               if split == "test" else "")
        share = f"{r['teacher_share']:.3f}" if r["teacher_share"] is not None else "–"
        coll = f"**{r['collapsed']}/{r['n']}**" if r["collapsed"] else f"0/{r['n']}"
        n = f"{r['n']}" + (f" (of {r['of']})" if r["of"] != r["n"] else "")
        lines.append(f"{lead(r)} {n} | {score} |{f1}{val} {share} | {coll} |")
    points = f"{split} {label}, negative is better" if lm else f"{split} {label} points"
    for title, diffs in (("plain KD", paired), ("the student without a teacher (policy none)", vs_baseline)):
        if not diffs and title != "plain KD":
            continue
        lines += ["", f"### Difference to {title} at the same depth, chain and seed ({points}, 95% intervals)", "",
                  head + f" n | Δ {label} | t interval | paired bootstrap |", sep + "---|---|---|---|"]
        for r in diffs:
            m = r.get("metric") or "accuracy"
            t, b = _interval(m, r["t_low"], r["t_high"]), _interval(m, r["boot_low"], r["boot_high"])
            lines.append(f"{lead(r)} {r['n']} | {_value(m, r['diff'], True)} | {t} | {b} |")
        if any(r["n"] == 1 for r in diffs):
            lines += ["", "Rows with n = 1 rest on **one seed**: their bootstrap resamples that run's "
                      f"{split} examples only, not the seed-to-seed spread, so no difference there is significant."]
    return "\n".join(lines) + "\n"


# ---- one table across tasks (GLUE) --------------------------------------------------------------

#: GLUE's tasks in the order papers print them, and the columns of each (MNLI: matched and
#: mismatched, the mismatched score from its ``validation_mismatched`` evaluation).
GLUE_ORDER = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli")
GLUE_TITLES = {"cola": "CoLA", "sst2": "SST-2", "mrpc": "MRPC", "qqp": "QQP", "stsb": "STS-B", "mnli": "MNLI",
               "qnli": "QNLI", "rte": "RTE", "wnli": "WNLI"}


def _title(task: str) -> str:
    return GLUE_TITLES.get(task[5:], task) if task.startswith("glue/") else task


def _mismatched(row: dict) -> str | None:
    """MNLI's second score (its ``data.also_evaluate`` split): the row key, or None."""
    if row.get("task") != "glue/mnli":
        return None
    return next((k for k in row if k.endswith("_score") and k not in ("test_score", "val_score")), None)


def _task_columns(rows: list[dict], split: str) -> list[tuple[str, str, str]]:
    """(column title, task, row key of its score) for every task in the rows, in GLUE's order."""
    names = sorted({r["task"] for r in rows if r.get("task")},
                   key=lambda t: (GLUE_ORDER.index(t[5:]) if t.startswith("glue/") and t[5:] in GLUE_ORDER
                                  else len(GLUE_ORDER), t))
    k = SPLIT_KEY[split]
    cols = []
    for task in names:
        second = next((m for r in rows if r.get("task") == task and (m := _mismatched(r))), None)
        metric = next((r["metric"] for r in rows if r.get("task") == task and r.get("metric")), None)
        if second:
            cols += [("MNLI-m", task, f"{k}_score"), ("MNLI-mm", task, second)]
        elif metric in PARTS:  # a combined metric: its parts, as papers print them (the mean enters the average)
            cols += [(f"{_title(task)} {label}", task, f"{k}_{suffix}") for label, suffix in PARTS[metric]]
        else:
            cols.append((_title(task), task, f"{k}_score"))
    return cols


#: the columns of a combined metric's parts: (title suffix, row key suffix; see aggregate.COMPONENTS)
PARTS = {"f1_accuracy": (("F1", "f1"), ("acc", "acc")), "pearson_spearman": (("Pearson", "pearson"), ("Spearman", "spearman"))}


def average_label(tasks: list[str], split: str) -> str:
    """What the cross-task average is, said plainly: GLUE's official score needs all nine tasks on
    the hidden test sets, which no run here has, so it is never called "the GLUE score"; tasks
    from outside GLUE are named, never averaged in silently."""
    other = [t for t in tasks if not t.startswith("glue/")]
    if other:
        return f"average over {len(tasks)} tasks ({len(other)} not from GLUE: {', '.join(other)})"
    return f"GLUE {'dev' if split == 'validation' else split} average over {len(tasks)} tasks"


def _task_score(row: dict, split: str) -> float:
    """A task's GLUE score for the average: its metric, MNLI's matched and mismatched averaged."""
    second = _mismatched(row)
    return float(np.mean([row[f"{SPLIT_KEY[split]}_score"], *([row[second]] if second else [])]))


def _task_details(rows: list[dict]) -> set[str]:
    """Columns that only say which task a row is (its data files, when a grid names them beside
    ``data.name``): one value within each task, and not the same across tasks."""
    keys = {k for r in rows for k in r if k not in GROUP_OMIT and k != "task"}
    details = set()
    for key in keys:
        per_task = defaultdict(set)  # rows without the key (a teacher's) say nothing
        for r in rows:
            if r.get(key) is not None:
                per_task[r["task"]].add(repr(r[key]))
        if per_task and all(len(v) == 1 for v in per_task.values()) and len(set.union(*per_task.values())) > 1:
            details.add(key)
    return details


def cross_task(rows: list[dict], split: str | None = None) -> dict | None:
    """For rows over several tasks: per model group (role, depth, chain, policy, tutor mode) and
    task column, the scores over seeds; and per seed the average over tasks (each task's metric,
    MNLI counting once as the mean of matched and mismatched; see :func:`average_label` for what
    it is called). None for a one-task sweep."""
    done = [r for r in rows if r["state"] == "done" and r.get("task")]
    if len({r["task"] for r in done}) < 2:
        return None
    split = split or headline_split(rows)
    cols = _task_columns(done, split)
    groups: dict = defaultdict(lambda: defaultdict(dict))  # group -> task -> seed -> row
    details = _task_details(done) | {"task"}
    for r in done:
        key = tuple((k, v) for k, v in _group_key(r) if k not in details) + (("role", r["role"]),)
        groups[key][r["task"]][r.get("seed") or 0] = r
    tasks = list(dict.fromkeys(task for _, task, _ in cols))
    out = []
    for key, by_task in groups.items():
        cells = {}
        for title, task, column in cols:
            values = [r[column] for r in by_task.get(task, {}).values() if r.get(column) is not None]
            cells[title] = values
        seeds = set.intersection(*(set(by_task.get(t, {})) for t in tasks))
        average = [float(np.mean([_task_score(by_task[t][s], split) for t in tasks])) for s in sorted(seeds)]
        out.append({**dict(key), "cells": cells, "average": average})
    order = {"teacher": 0, "tutor": 1, "student": 2}
    out.sort(key=lambda r: (order.get(r["role"], 3), *_order(r)))
    return {"split": split, "columns": [title for title, _, _ in cols], "tasks": tasks, "groups": out,
            "average": average_label(tasks, split)}


def _mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    std = f" ± {100 * np.std(values, ddof=1):.2f}" if len(values) > 1 else ""
    return f"{100 * np.mean(values):.2f}{std}"


def cross_task_markdown(table: dict, paired: list[dict]) -> str:
    """The cross-task table, and each policy's mean paired difference to plain KD per task (the
    rows of :func:`paired_vs_kd`)."""
    split, cols = table["split"], table["columns"]
    head = "| model | depth | policy | tutor | " + " | ".join(cols) + f" | {table['average']} |"
    sep = "|---|---|---|---|" + "---|" * (len(cols) + 1)
    lines = [f"### All tasks ({split}, each task's metric, %, mean ± std over seeds)", "",
             "Each task counts once in the average, with its own metric: MNLI as the mean of matched and "
             "mismatched, MRPC and QQP as the mean of F1 and accuracy, STS-B as the mean of Pearson and "
             "Spearman (the columns show the parts).", "",
             head, sep]
    for g in table["groups"]:
        name = g["role"] if g["role"] != "student" else f"student{' ' + str(g.get('chain')) if (g.get('iteration') or 1) > 1 else ''}"
        cells = " | ".join(_mean_std(g["cells"].get(c, [])) for c in cols)
        lines.append(f"| {name} | {g.get('depth')} | {g.get('policy') or '–'} | {g.get('tutor_update') or '–'} | "
                     f"{cells} | {_mean_std(g['average'])} |")
    # each policy's paired difference to plain KD (paired_vs_kd's rows), a column per task
    by_group: dict = defaultdict(dict)
    for r in paired:
        if r.get("task"):
            group = (r.get("iteration") or 1, -(r.get("depth") or 0), str(r.get("chain")), str(r.get("tutor_update")), r["policy"])
            by_group[group][r["task"]] = r
    if by_group:
        tasks = table["tasks"]
        lines += ["", f"### Difference to plain KD per task ({split} score points, mean over seeds)", "",
                  "| depth | chain | policy | tutor | " + " | ".join(_title(t) for t in tasks) + " |",
                  "|---|---|---|---|" + "---|" * len(tasks)]
        for (_, neg_depth, chain, mode, policy), by_task in sorted(by_group.items()):
            cells = " | ".join(f"{_value(r['metric'], r['diff'], True)} (n={r['n']})" if (r := by_task.get(t)) else "–"
                               for t in tasks)
            lines.append(f"| {-neg_depth} | {chain} | {policy} | {mode} | {cells} |")
    return "\n".join(lines) + "\n"


# ---- plots ------------------------------------------------------------------------------------

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _panels(plt, n: int):
    """One row of ``n`` panels (one per tutor mode) sharing the y axis."""
    return plt.subplots(1, n, figsize=(6 * n, 4.5), sharey=True, squeeze=False)


def _save_panels(plt, fig, axes, ylabel: str, path: Path) -> None:
    axes[0][0].set_ylabel(ylabel)
    for ax in axes[0]:  # each panel names its own lines
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_accuracy_vs_depth(summ: list[dict], path: Path) -> None:
    plt = _plt()
    modes = sorted({r.get("tutor_update") for r in summ if r.get("tutor_update")}) or [None]
    fig, axes = _panels(plt, len(modes))
    # one line per policy (and per iteration, when chains have several: another iteration's
    # student of the same depth is another model), in one colour in every panel
    series = sorted({(r["policy"], r.get("iteration") or 1) for r in summ})
    chained = any(it > 1 for _, it in series)
    for ax, mode in zip(axes[0], modes):
        for n, (policy, iteration) in enumerate(series):
            pts = sorted((r["depth"], r["score_mean"], r["score_std"] or 0.0) for r in summ
                         if r["policy"] == policy and (r.get("iteration") or 1) == iteration
                         and r["score_mean"] is not None and (r.get("tutor_update") in (mode, None)))
            if pts:
                d, m, s = zip(*pts)
                scale = -1 if summ[0].get("metric") == "token_nll" else 100  # NLL itself, else percent
                ax.errorbar(d, np.array(m) * scale, yerr=np.array(s) * abs(scale), marker="o", capsize=3,
                            label=f"{policy} (iteration {iteration})" if chained else policy,
                            linestyle="--" if policy == "teacher" else "-", color=f"C{n % 10}")
        ax.set_title(f"tutor: {mode}" if mode else "students")
        ax.set_xticks(sorted({r["depth"] for r in summ if r.get("depth") is not None}))
        ax.set_xlabel("student depth (layers)")
        ax.grid(alpha=0.3)
    split = summ[0]["split"] if summ else "validation"
    units = "" if summ and summ[0].get("metric") == "token_nll" else " (%)"
    _save_panels(plt, fig, axes, f"{split} {metric_label(summ)}{units}, mean ± std over seeds", path)


def plot_teacher_share(root: Path, rows: list[dict], path: Path) -> None:
    """Teacher share over training (per logged window), mean over seeds and depths, per policy."""
    plt = _plt()
    curves = defaultdict(list)
    for r in students_done(rows):
        if plain_kd(r):
            continue
        logs = [m for m in SweepDir(root).run(r["run"]).metrics() if m["type"] == "train" and "teacher_share" in m]
        if logs:
            total = max(m["step"] for m in logs)
            curves[(r.get("tutor_update"), r["policy"])].append(
                (np.array([m["step"] / total for m in logs]), np.array([m["teacher_share"] for m in logs])))
    modes = sorted({k[0] for k in curves}) or [None]
    fig, axes = _panels(plt, len(modes))
    grid = np.linspace(0, 1, 21)
    for ax, mode in zip(axes[0], modes):
        for (m, policy), runs in sorted(curves.items(), key=lambda kv: str(kv[0])):
            if m != mode:
                continue
            ys = np.mean([np.interp(grid, x, y) for x, y in runs], axis=0)
            ax.plot(grid, ys, label=policy)
        ax.set_title(f"tutor: {mode}")
        ax.set_xlabel("training progress")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    _save_panels(plt, fig, axes, "share of weight on the teacher", path)


def plot_confusion(matrix: list[list[int]], title: str, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(3.6, 3.2))
    m = np.asarray(matrix)
    ax.imshow(m, cmap="Blues")
    for (i, j), v in np.ndenumerate(m):
        ax.text(j, i, str(v), ha="center", va="center")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_xticks(range(m.shape[1]))
    ax.set_yticks(range(m.shape[0]))
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(root: str | Path, rows: list[dict]) -> str | None:
    """summary.md and plots/ for a sweep with student runs; returns the summary text."""
    root, sweep = Path(root), SweepDir(root)
    if not students_done(rows):
        return None
    summ = summary(rows)
    paired = paired_vs_kd(root, rows)
    table = cross_task(rows)
    text = ((cross_task_markdown(table, paired) + "\n" if table else "")
            + summary_markdown(summ, paired, paired_vs_baseline(root, rows)))
    write_atomic(sweep.summary_file, text)
    plots = sweep.plots
    plots.mkdir(exist_ok=True)
    for old in plots.glob("accuracy_vs_depth*.png"):
        old.unlink()
    tasks = sorted({r.get("task") for r in summ if r.get("task")})
    if len(tasks) > 1:  # one plot per task: their metrics differ
        for task in tasks:
            plot_accuracy_vs_depth([r for r in summ if r.get("task") == task],
                                   plots / f"accuracy_vs_depth_{task.replace('/', '_')}.png")
    else:
        plot_accuracy_vs_depth(summ, plots / "accuracy_vs_depth.png")
    plot_teacher_share(root, rows, plots / "teacher_share.png")
    for old in plots.glob("confusion_*.png"):
        old.unlink()
    for r in students_done(rows):
        if r["collapsed"] and "confusion" in (res := sweep.run(r["run"]).result())["validation"]:
            title = f"{r['run']}\n{r['depth']} layers, {r['policy']}, {r.get('tutor_update')}, seed {r['seed']}"
            plot_confusion(res["validation"]["confusion"], title, plots / f"confusion_{r['run']}.png")
    return text
