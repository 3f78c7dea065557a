"""Statistics and plots over a sweep's rows (pure functions of the run folders).

The headline split is **test** where every finished student has a labelled test split (the
embedded data has one), else **validation**, which also picked each run's best epoch and
stopped it: the tables say so in their header. Validation stays beside the test numbers.

- ``summary``: per (depth, iteration and chain, policy, tutor mode, other axes) over seeds: n,
  mean ± std of headline accuracy and macro-F1 and of validation accuracy, collapsed runs, mean
  teacher share.
- ``paired_vs_kd``: each policy against plain KD (policy ``teacher``) at the same depth,
  iteration, chain and seed: the mean paired difference in headline accuracy with two 95%
  intervals, a t interval over seeds and a paired bootstrap that resamples both sentences of the
  headline split and seeds.
- ``write_report``: ``summary.md`` and PNG plots under ``plots/``.
"""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from .rundir import SweepDir, write_atomic

GROUP_OMIT = ("seed", "val_acc", "val_macro_f1", "test_acc", "test_macro_f1", "teacher_share", "teacher_batches",
              "collapsed", "params", "state", "run", "role")
SPLIT_KEY = {"test": "test", "validation": "val"}


def _t975(df: int) -> float:
    """The two-sided 95% quantile of Student's t with ``df`` degrees of freedom (exact)."""
    from scipy.stats import t

    return float(t.ppf(0.975, df))


def headline_split(rows: list[dict]) -> str:
    """``test`` when every finished student has test numbers, else ``validation``."""
    done = students_done(rows)
    return "test" if done and all(r.get("test_acc") is not None for r in done) else "validation"


def _group_key(row: dict) -> tuple:
    return tuple(sorted((k, v) for k, v in row.items() if k not in GROUP_OMIT and not isinstance(v, (list, dict))))


def plain_kd(row: dict) -> bool:
    """A student of plain KD: the plan resolved its tutor mode to ``none`` (no tutor; recorded
    in sweep.json as ``tutor_update: null``), which is what the paired differences compare to."""
    return row.get("tutor_update") is None


def students_done(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["role"] == "student" and r["state"] == "done"]


def summary(rows: list[dict], split: str | None = None) -> list[dict]:
    """Per group over seeds; ``acc_*`` and ``f1_*`` on ``split`` (default: the headline split),
    ``val_*`` on validation."""
    split = split or headline_split(rows)
    k = SPLIT_KEY[split]
    groups = defaultdict(dict)
    for row in rows:
        if row["role"] == "student":  # one run may serve several cells (plain KD: every tutor mode)
            groups[_group_key(row)][row["run"]] = row
    out = []
    for key, by_run in groups.items():
        members = list(by_run.values())
        done = [m for m in members if m["state"] == "done"]
        acc = np.array([m[f"{k}_acc"] for m in done], dtype=float)
        f1 = np.array([m[f"{k}_macro_f1"] for m in done], dtype=float)
        val = np.array([m["val_acc"] for m in done], dtype=float)
        shares = [m["teacher_share"] for m in done if m["teacher_share"] is not None]
        out.append({**dict(key), "n": len(done), "of": len(members), "split": split,
                    "acc_mean": float(acc.mean()) if len(acc) else None,
                    "acc_std": float(acc.std(ddof=1)) if len(acc) > 1 else None,
                    "f1_mean": float(f1.mean()) if len(f1) else None,
                    "f1_std": float(f1.std(ddof=1)) if len(f1) > 1 else None,
                    "val_mean": float(val.mean()) if len(val) else None,
                    "val_std": float(val.std(ddof=1)) if len(val) > 1 else None,
                    "collapsed": sum(bool(m["collapsed"]) for m in done),
                    "teacher_share": float(np.mean(shares)) if shares else None})
    return sorted(out, key=_order)


def _order(r: dict) -> tuple:
    return (r.get("iteration") or 0, -(r.get("depth") or 0), str(r.get("chain")), str(r.get("tutor_update")),
            str(r.get("policy")))


def _correct(root: Path, run: str, split: str) -> np.ndarray | None:
    correct = SweepDir(root).run(run).result()[split].get("correct")  # absent in older results
    return None if correct is None else np.asarray(correct, dtype=float)


def paired_vs_kd(root: Path, rows: list[dict], n_boot: int = 4000, seed: int = 0, split: str | None = None) -> list[dict]:
    """Differences in accuracy on ``split`` (default: the headline split) against plain KD, paired
    by depth, iteration, chain, other axes and seed."""
    split = split or headline_split(rows)
    k = SPLIT_KEY[split]
    done = students_done(rows)
    baseline = {}
    for r in done:
        if plain_kd(r):
            base_key = tuple((k, v) for k, v in _group_key(r) if k not in ("policy", "tutor_update"))
            baseline[(base_key, r["seed"])] = r
    groups = defaultdict(list)
    for r in done:
        if not plain_kd(r):
            groups[_group_key(r)].append(r)
    rng = np.random.default_rng(seed)
    out = []
    for key, members in groups.items():
        base_key = tuple((k, v) for k, v in key if k not in ("policy", "tutor_update"))
        pairs = [(m, baseline[(base_key, m["seed"])]) for m in members if (base_key, m["seed"]) in baseline]
        if not pairs:
            continue
        diffs = np.array([m[f"{k}_acc"] - b[f"{k}_acc"] for m, b in pairs])
        n = len(diffs)
        mean = float(diffs.mean())
        row = {**dict(key), "n": n, "split": split, "diff": mean, "t_low": None, "t_high": None}
        if n > 1:
            half = _t975(n - 1) * diffs.std(ddof=1) / math.sqrt(n)
            row["t_low"], row["t_high"] = mean - half, mean + half
        # paired bootstrap: resample sentences (same ones for both models) and seeds
        per_example = [(_correct(root, m["run"], split), _correct(root, b["run"], split)) for m, b in pairs]
        row["boot_low"] = row["boot_high"] = None
        if any(a is None or c is None for a, c in per_example):
            out.append(row)
            continue
        d = np.stack([a - c for a, c in per_example])  # [seeds, sentences]
        idx = rng.integers(0, d.shape[1], size=(n_boot, d.shape[1]))
        per_seed = d[:, idx].mean(axis=2)  # [seeds, boot]
        pick = rng.integers(0, n, size=(n_boot, n))
        boot = per_seed[pick, np.arange(n_boot)[:, None]].mean(axis=1)
        row["boot_low"], row["boot_high"] = (float(x) for x in np.percentile(boot, [2.5, 97.5]))
        out.append(row)
    return sorted(out, key=_order)


def _pct(x, signed=False) -> str:
    if x is None:
        return "–"
    return f"{100 * x:+.2f}" if signed else f"{100 * x:.2f}"


SPLIT_NOTE = {"test": "test split (validation picked each run's best epoch; it is shown beside)",
              "validation": "validation split: no labelled test split, and validation also picked each "
                            "run's best epoch and stopped it, so these numbers are optimistic"}


def summary_markdown(summ: list[dict], paired: list[dict]) -> str:
    split = (summ or paired or [{"split": "validation"}])[0]["split"]
    chained = any((r.get("iteration") or 1) > 1 for r in summ)
    head = "| depth | chain | policy | tutor |" if chained else "| depth | policy | tutor |"
    sep = "|---|---|---|---|" if chained else "|---|---|---|"

    def lead(r):
        cells = [str(r.get("depth")), *([str(r.get("chain"))] if chained else []), str(r.get("policy")),
                 str(r.get("tutor_update") or "–")]
        return "| " + " | ".join(cells) + " |"

    lines = [f"Headline numbers on the {SPLIT_NOTE[split]}.", "",
             f"### {split.capitalize()} accuracy over seeds (%, mean ± std)", "",
             head + f" n | {split} accuracy | {split} macro-F1 |" + (" validation accuracy |" if split == "test" else "")
             + " teacher share | collapsed |",
             sep + "---|---|---|" + ("---|" if split == "test" else "") + "---|---|"]
    for r in summ:
        acc = f"{_pct(r['acc_mean'])} ± {_pct(r['acc_std'])}" if r["acc_mean"] is not None else "–"
        f1 = f"{_pct(r['f1_mean'])} ± {_pct(r['f1_std'])}" if r["f1_mean"] is not None else "–"
        val = f" {_pct(r['val_mean'])} ± {_pct(r['val_std'])} |" if split == "test" else ""
        share = f"{r['teacher_share']:.3f}" if r["teacher_share"] is not None else "–"
        coll = f"**{r['collapsed']}/{r['n']}**" if r["collapsed"] else f"0/{r['n']}"
        n = f"{r['n']}" + (f" (of {r['of']})" if r["of"] != r["n"] else "")
        lines.append(f"{lead(r)} {n} | {acc} | {f1} |{val} {share} | {coll} |")
    lines += ["", f"### Difference to plain KD at the same depth, chain and seed ({split} accuracy points, 95% intervals)", "",
              head + " n | Δ accuracy | t interval | paired bootstrap |", sep + "---|---|---|---|"]
    for r in paired:
        t = f"[{_pct(r['t_low'], True)}, {_pct(r['t_high'], True)}]" if r["t_low"] is not None else "–"
        b = f"[{_pct(r['boot_low'], True)}, {_pct(r['boot_high'], True)}]" if r["boot_low"] is not None else "–"
        lines.append(f"{lead(r)} {r['n']} | {_pct(r['diff'], True)} | {t} | {b} |")
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
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_accuracy_vs_depth(summ: list[dict], path: Path) -> None:
    plt = _plt()
    modes = sorted({r.get("tutor_update") for r in summ if r.get("tutor_update")}) or [None]
    fig, axes = _panels(plt, len(modes))
    for ax, mode in zip(axes[0], modes):
        # one line per policy (and per iteration, when chains have several: another iteration's
        # student of the same depth is another model)
        series = sorted({(r["policy"], r.get("iteration") or 1) for r in summ})
        chained = any(it > 1 for _, it in series)
        for policy, iteration in series:
            pts = sorted((r["depth"], r["acc_mean"], r["acc_std"] or 0.0) for r in summ
                         if r["policy"] == policy and (r.get("iteration") or 1) == iteration
                         and r["acc_mean"] is not None and (r.get("tutor_update") in (mode, None)))
            if pts:
                d, m, s = zip(*pts)
                ax.errorbar(d, np.array(m) * 100, yerr=np.array(s) * 100, marker="o", capsize=3,
                            label=f"{policy} (iteration {iteration})" if chained else policy,
                            linestyle="--" if policy == "teacher" else "-")
        ax.set_title(f"tutor: {mode}" if mode else "students")
        ax.set_xticks(sorted({r["depth"] for r in summ if r.get("depth") is not None}))
        ax.set_xlabel("student depth (layers)")
        ax.grid(alpha=0.3)
    split = summ[0]["split"] if summ else "validation"
    _save_panels(plt, fig, axes, f"{split} accuracy (%), mean ± std over seeds", path)


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
    text = summary_markdown(summ, paired)
    write_atomic(sweep.summary_file, text)
    plots = sweep.plots
    plots.mkdir(exist_ok=True)
    plot_accuracy_vs_depth(summ, plots / "accuracy_vs_depth.png")
    plot_teacher_share(root, rows, plots / "teacher_share.png")
    for old in plots.glob("confusion_*.png"):
        old.unlink()
    for r in students_done(rows):
        if r["collapsed"]:
            res = sweep.run(r["run"]).result()
            title = f"{r['run']}\n{r['depth']} layers, {r['policy']}, {r.get('tutor_update')}, seed {r['seed']}"
            plot_confusion(res["validation"]["confusion"], title, plots / f"confusion_{r['run']}.png")
    return text
