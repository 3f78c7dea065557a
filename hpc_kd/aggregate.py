"""Run folders -> one results table. ``python -m hpc_kd.aggregate results/<sweep>``

A function of what is on disk: ``sweep.json`` (written by the launcher: the cells and the
stage chain of each) and each stage's ``result.json`` / ``error.json`` / ``job.json`` (for a
queued stage the scheduler is asked whether it is pending or running; see :mod:`hpc_kd.status`).
Stages that have not finished appear with their state (pending, running, failed, blocked,
missing), never silently dropped. Writes ``table.md`` (also printed),
``table.csv`` and ``table.parquet`` next to ``sweep.json``.
"""
from __future__ import annotations

import csv
import io
import sys
from pathlib import Path

from .rundir import SweepDir, sweep_dir_argument, write_atomic
from .status import State, ordered, stage_states

COLUMNS = ["role", "depth", "iteration", "chain", "policy", "seed", "tutor_update", "metric", "test_score",
           "test_acc", "test_macro_f1", "test_nll", "test_nll_start", "val_score", "val_acc", "val_macro_f1", "val_nll",
           "val_ppl", "test_choice_acc", "val_choice_acc", "agreement", "teacher_share", "teacher_batches", "collapsed",
           "params", "state", "run"]
#: ``test_score`` / ``val_score`` are the task's metric (``metric``; a language model's is −token
#: NLL, and its rows show ``*_nll``, validation perplexity and top-1 agreement with the teacher, with
#: ``collapsed`` its degenerate flag, and with ``data.choices`` ``*_choice_acc``, its choice
#: accuracy, and ``test_nll_start``, its test token NLL before its first step); a run's further evaluated
#: splits (``data.also_evaluate``) add ``<split>_score``. A sweep over ``data.name`` has a ``task``
#: column.

#: the parts of a combined metric, shown beside it: (result key, column suffix)
COMPONENTS = {"f1_accuracy": (("f1_pos", "f1"),), "pearson_spearman": (("pearson", "pearson"), ("spearman", "spearman"))}

STANDARD_AXES = ("student.layers", "distill.policy", "seed", "distill.tutor_update")
AXIS_NAMES = {"data.name": "task"}


def _row(root: Path, key: str, sweep: dict, extra: dict, states: dict) -> dict:
    info = sweep["stages"][key]
    row = {c: None for c in COLUMNS}
    row.update({"role": info["role"], "depth": info["layers"], "run": key, "state": states[key].state})
    row.update(extra)
    if row["state"] == State.DONE:
        run = SweepDir(root).run(key, info)
        try:
            _fill(row, run.result())
        except (KeyError, TypeError, ValueError, AttributeError, OSError) as err:  # read, but not a result
            row.update({c: None for c in COLUMNS if c not in ("role", "run") and c not in extra})
            row.update({"depth": info["layers"], "state": State.DAMAGED,
                        "damage": f"{run.result_file} does not hold a result ({type(err).__name__}: {err}); "
                                  f"delete it and relaunch to run the stage again"})
    elif row["state"] == State.DAMAGED:
        row["damage"] = states[key].detail
    return row


def _fill(row: dict, res: dict) -> None:
    """A finished run's columns from its ``result.json``."""
    row["depth"] = res.get("layers", row["depth"])
    row["metric"] = res["validation"].get("metric", "accuracy")
    for split, prefix in (("validation", "val"), ("test", "test")):
        if split in res:
            # results from before the task metric have accuracy only, which was their metric
            row[f"{prefix}_score"] = res[split].get("score", res[split].get("accuracy"))
            row[f"{prefix}_acc"] = res[split].get("accuracy")
            row[f"{prefix}_macro_f1"] = res[split].get("macro_f1")
            row[f"{prefix}_nll"] = res[split].get("token_nll")
            row[f"{prefix}_choice_acc"] = res[split].get("choice_accuracy")
            for part, name in COMPONENTS.get(res[split].get("metric"), ()):  # a combined metric's parts
                row[f"{prefix}_{name}"] = res[split].get(part)
    row["test_nll_start"] = res.get("initial_token_nll", {}).get("test")  # a language model before its first step
    row["val_ppl"] = res["validation"].get("perplexity")
    row["agreement"] = res["validation"].get("teacher_agreement")
    for split, value in res.items():  # data.also_evaluate
        if split not in ("validation", "test", "tutor_validation") and isinstance(value, dict) and "score" in value:
            row[f"{split}_score"] = value["score"]
    row["collapsed"] = res["validation"]["collapsed"]
    row["params"] = res.get("params")
    sel = res.get("selection")
    if sel:
        row["teacher_share"] = sel["teacher_share"]
        batches = sel["teacher_batches"] + sel["tutor_batches"] + sel["mixed_batches"]
        row["teacher_batches"] = f"{sel['teacher_batches']}/{batches}"


def _unigram_row(root: Path, key: str, sweep: dict, teacher: dict) -> list[dict]:
    """A language model's floor, under its fine-tuned teacher's row: the unigram model of the
    training tokens (``result.json``'s ``unigram``, add-one smoothed; :func:`hpc_kd.metrics.unigram_nll`)."""
    if teacher["state"] != State.DONE or teacher["metric"] != "token_nll":
        return []
    floor = SweepDir(root).run(key, sweep["stages"][key]).result().get("unigram")
    if not floor:  # a teacher from before the floor was recorded
        return []
    row = {c: None for c in COLUMNS}
    if "task" in teacher:  # a sweep over data.name
        row["task"] = teacher["task"]
    row.update({"role": "unigram", "metric": "token_nll", "state": State.DONE, "run": key, "collapsed": False})
    for split, prefix in (("validation", "val"), ("test", "test")):
        if split in floor:
            row[f"{prefix}_nll"], row[f"{prefix}_score"] = floor[split], -floor[split]
    return [row]


def collect(root: str | Path, states: dict | None = None) -> list[dict]:
    """One row per shared teacher / tutor, then one per (cell, iteration) student. ``states``:
    each stage's :class:`hpc_kd.status.StageStatus` (default: looked up now, asking the scheduler
    about stages that have a job record)."""
    root = Path(root)
    sweep = SweepDir(root).read_sweep()
    if states is None:
        states = stage_states(root, ordered(sweep))
    rows, seen = [], set()
    role = lambda key: sweep["stages"][key]["role"]  # noqa: E731
    for cell in sweep["cells"]:
        task = {"task": cell["values"]["data.name"]} if "data.name" in cell["values"] else {}
        for key in cell["chain"]:
            if role(key) in ("teacher", "tutor") and key not in seen:
                seen.add(key)
                rows.append(_row(root, key, sweep, task, states))
                rows.extend(_unigram_row(root, key, sweep, rows[-1]))
    for cell in sweep["cells"]:
        # grid axes that have no column of their own (tau, alpha, ...) get one, by last key part
        axes = {AXIS_NAMES.get(k, k.rsplit(".", 1)[-1]): v for k, v in cell["values"].items() if k not in STANDARD_AXES}
        depths = []
        for key in cell["chain"]:
            if role(key) == "student":
                # iteration k's student is told apart from another of its depth by the chain before it
                depths.append(str(sweep["stages"][key]["layers"]))
                extra = {"iteration": len(depths), "chain": "→".join(depths), "policy": cell["policy"],
                         "seed": cell["seed"], "tutor_update": cell["tutor_update"], **axes}
                rows.append(_row(root, key, sweep, extra, states))
    return rows


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "COLLAPSED" if value else "no"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def columns_of(rows: list[dict]) -> list[str]:
    extra = [k for row in rows for k in row if k not in COLUMNS]
    return COLUMNS[:-2] + list(dict.fromkeys(extra)) + COLUMNS[-2:]


def shown_columns(rows: list[dict]) -> list[str]:
    """The markdown table's columns: every column but those empty in every row, and accuracy
    when it is the metric of every row (it is then the score column)."""
    cols = [c for c in columns_of(rows) if c in ("role", "state", "run") or any(r.get(c) is not None for r in rows)]
    if all(r.get("metric") in (None, "accuracy") for r in rows):
        cols = [c for c in cols if c not in ("test_acc", "val_acc")]
    if all(r.get("metric") in (None, "token_nll") for r in rows):  # a language model's: the NLL columns
        cols = [c for c in cols if c not in ("test_score", "val_score")]
    return cols


def to_markdown(rows: list[dict]) -> str:
    cols = shown_columns(rows)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(_fmt(row.get(c)) for c in cols) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_tables(root: str | Path, rows: list[dict]) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sweep = SweepDir(root)
    markdown = to_markdown(rows)
    write_atomic(sweep.table("md"), markdown)
    cols = columns_of(rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(sweep.table("csv"), buf.getvalue())
    table = pa.Table.from_pylist([{c: (None if row.get(c) is None else str(row[c]) if c in ("teacher_batches", "run", "state", "role", "policy", "tutor_update", "chain") else row.get(c)) for c in cols} for row in rows])
    parquet = sweep.table("parquet")
    tmp = parquet.with_name(f".{parquet.name}.tmp")
    pq.write_table(table, tmp)
    tmp.replace(parquet)
    return markdown


def cache_note(root: Path) -> str:
    """One line on the logit caches of the sweep and their size on disk."""
    sweep = SweepDir(root)
    sizes = []
    for key, info in sweep.read_sweep()["stages"].items():
        run = sweep.run(key)
        if info["kind"] == "cache" and run.done():
            res = run.result()
            if isinstance(res.get("rows"), int) and isinstance(res.get("bytes"), int):
                sizes.append((res["rows"], res["bytes"]))
    if not sizes:
        return ""
    total = sum(b for _, b in sizes)
    return f"logit caches: {len(sizes)} ({', '.join(f'{r} rows' for r, _ in sizes)}), {total / 1024:.1f} KiB on disk\n"


def aggregate(root: str | Path) -> str:
    """Write the table, and for sweeps with finished students the statistics and plots; return
    what to print."""
    from .report import write_report

    root = Path(root)
    rows = collect(root)
    damage = [row.pop("damage") for row in rows if "damage" in row]
    text = write_tables(root, rows) + cache_note(root)
    if damage:
        text += f"\n{len(damage)} row(s) could not be read:\n"
        text += "".join(f"  {line}\n" for line in dict.fromkeys(damage))
    summary = write_report(root, rows)
    if summary:
        sweep = SweepDir(root)
        text += "\n" + summary + f"\n(written to {sweep.table('md')}, {sweep.summary_file.name} and {sweep.plots.name}/)\n"
    return text


def main(argv=None) -> int:
    import argparse

    from .trackers import NAMES, push

    parser = argparse.ArgumentParser(prog="python -m hpc_kd.aggregate", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", help="results/<sweep>, the folder holding sweep.json")
    parser.add_argument("--push", nargs="+", default=[], choices=NAMES, metavar="TRACKER",
                        help=f"also send the table and summary to experiment trackers ({', '.join(NAMES)})")
    args = parser.parse_args(argv)
    root = sweep_dir_argument("python -m hpc_kd.aggregate", "", [args.sweep_dir])
    if root is None:
        return 2
    print(aggregate(root), end="")
    print(push(root, args.push), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
