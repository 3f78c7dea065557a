"""Aggregation statistics and plots over a real (tiny) sweep with seeds."""
import numpy as np
import pytest

from hpc_kd.aggregate import collect
from hpc_kd.launch import main as launch
from hpc_kd.report import paired_vs_kd, summary, write_report
from hpc_kd.rundir import RunDir

from .conftest import tiny_config, write_yaml


@pytest.fixture(scope="module")
def sweep(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    data = tiny_config(tiny_model, root, student={"layers": [2], "train": {"lr": 1e-3, "batch_size": 16, "epochs": 1}},
                       grid={"distill.policy": ["teacher", "min_loss"], "seed": [0, 1, 2]})
    assert launch([str(write_yaml(root / "s.yaml", data)), "--executor", "debug"]) == 0
    return root / "t"


def test_summary_over_seeds(sweep):
    rows = collect(sweep)
    students = [r for r in rows if r["role"] == "student"]
    assert len(students) == 6
    summ = {r["policy"]: r for r in summary(rows)}
    kd = [r["val_acc"] for r in students if r["policy"] == "teacher"]
    assert summ["teacher"]["n"] == 3
    assert summ["teacher"]["acc_mean"] == pytest.approx(np.mean(kd))
    assert summ["teacher"]["acc_std"] == pytest.approx(np.std(kd, ddof=1))


def test_paired_difference_against_kd(sweep):
    rows = collect(sweep)
    (row,) = paired_vs_kd(sweep, rows, n_boot=500)
    by_seed = {(r["policy"], r["seed"]): r["val_acc"] for r in rows if r["role"] == "student"}
    diffs = [by_seed[("min_loss", s)] - by_seed[("teacher", s)] for s in range(3)]
    assert row["policy"] == "min_loss" and row["n"] == 3
    assert row["diff"] == pytest.approx(np.mean(diffs))
    half = 4.303 * np.std(diffs, ddof=1) / np.sqrt(3)
    assert (row["t_low"], row["t_high"]) == pytest.approx((np.mean(diffs) - half, np.mean(diffs) + half))
    assert row["boot_low"] <= row["diff"] + 1e-9 and row["diff"] - 1e-9 <= row["boot_high"]
    # the per-example record behind the bootstrap matches the reported accuracy
    any_run = next(r for r in rows if r["role"] == "student")
    correct = RunDir(sweep / "runs" / any_run["run"]).result()["validation"]["correct"]
    assert np.mean(correct) == pytest.approx(any_run["val_acc"])


def test_report_files(sweep):
    rows = collect(sweep)
    text = write_report(sweep, rows)
    assert "Difference to plain KD" in text and (sweep / "summary.md").read_text() == text
    for name in ("accuracy_vs_depth.png", "teacher_share.png"):
        assert (sweep / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    collapsed = [r for r in rows if r["role"] == "student" and r["collapsed"]]
    assert sorted(p.name for p in (sweep / "plots").glob("confusion_*.png")) == sorted(f"confusion_{r['run']}.png" for r in collapsed)


def test_a_run_shared_by_cells_counts_once(sweep):
    rows = collect(sweep)
    doubled = rows + [dict(r) for r in rows if r["role"] == "student" and r["policy"] == "teacher"]
    summ = {r["policy"]: r for r in summary(doubled)}
    assert summ["teacher"]["n"] == 3 and summ["teacher"]["of"] == 3
