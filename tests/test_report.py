"""Aggregation statistics and plots over a real (tiny) sweep with seeds."""
import json

import numpy as np
import pytest

from hpc_kd.aggregate import collect
from hpc_kd.launch import main as launch
from hpc_kd.report import paired_vs_baseline, paired_vs_kd, summary, write_report
from hpc_kd.rundir import RunDir

from .conftest import tiny_config, write_yaml


@pytest.fixture(scope="module")
def sweep(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    data = tiny_config(tiny_model, root, student={"layers": [2], "train": {"lr": 1e-3, "batch_size": 16, "epochs": 1}},
                       grid={"distill.policy": ["teacher", "min_loss", "none"], "seed": [0, 1, 2]})
    assert launch([str(write_yaml(root / "s.yaml", data)), "--executor", "debug"]) == 0
    return root / "t"


def test_summary_over_seeds(sweep):
    rows = collect(sweep)
    students = [r for r in rows if r["role"] == "student"]
    assert len(students) == 9
    summ = {r["policy"]: r for r in summary(rows)}
    kd = [r["test_acc"] for r in students if r["policy"] == "teacher"]  # the headline: test
    kd_val = [r["val_acc"] for r in students if r["policy"] == "teacher"]
    assert summ["teacher"]["n"] == 3 and summ["teacher"]["split"] == "test"
    assert summ["teacher"]["score_mean"] == pytest.approx(np.mean(kd))
    assert summ["teacher"]["score_std"] == pytest.approx(np.std(kd, ddof=1))
    assert summ["teacher"]["val_mean"] == pytest.approx(np.mean(kd_val))
    assert summ["teacher"]["val_std"] == pytest.approx(np.std(kd_val, ddof=1))


def test_paired_difference_against_kd(sweep):
    rows = collect(sweep)
    against_kd = {r["policy"]: r for r in paired_vs_kd(sweep, rows, n_boot=500)}
    assert sorted(against_kd) == ["min_loss", "none"]  # none: the student without a teacher
    row = against_kd["min_loss"]
    by_seed = {(r["policy"], r["seed"]): r["test_acc"] for r in rows if r["role"] == "student"}
    diffs = [by_seed[("min_loss", s)] - by_seed[("teacher", s)] for s in range(3)]
    assert row["policy"] == "min_loss" and row["n"] == 3 and row["split"] == "test"
    assert row["diff"] == pytest.approx(np.mean(diffs))
    half = 4.303 * np.std(diffs, ddof=1) / np.sqrt(3)
    assert (row["t_low"], row["t_high"]) == pytest.approx((np.mean(diffs) - half, np.mean(diffs) + half))
    assert row["boot_low"] <= row["diff"] + 1e-9 and row["diff"] - 1e-9 <= row["boot_high"]
    # the per-example record behind the bootstrap matches the reported accuracy
    any_run = next(r for r in rows if r["role"] == "student")
    for split, column in (("test", "test_acc"), ("validation", "val_acc")):
        correct = RunDir(sweep / "runs" / any_run["run"]).result()[split]["correct"]
        assert np.mean(correct) == pytest.approx(any_run[column])
    # on validation when asked (a sweep with no labelled test split gets this by itself)
    val_row = next(r for r in paired_vs_kd(sweep, rows, n_boot=500, split="validation") if r["policy"] == "min_loss")
    val_by_seed = {(r["policy"], r["seed"]): r["val_acc"] for r in rows if r["role"] == "student"}
    assert val_row["diff"] == pytest.approx(np.mean([val_by_seed[("min_loss", s)] - val_by_seed[("teacher", s)]
                                                     for s in range(3)]))


def test_paired_difference_against_the_student_without_a_teacher(sweep):
    rows = collect(sweep)
    by_seed = {(r["policy"], r["seed"]): r["test_acc"] for r in rows if r["role"] == "student"}
    diffs = {r["policy"]: r for r in paired_vs_baseline(sweep, rows, n_boot=200)}
    assert sorted(diffs) == ["min_loss", "teacher"]
    for policy, row in diffs.items():
        assert row["n"] == 3 and row["diff"] == pytest.approx(np.mean([by_seed[(policy, s)] - by_seed[("none", s)]
                                                                        for s in range(3)]))


def test_report_files(sweep):
    rows = collect(sweep)
    text = write_report(sweep, rows)
    assert "Difference to plain KD" in text and "Difference to the student without a teacher" in text
    assert (sweep / "summary.md").read_text() == text
    assert text.startswith("Headline numbers on the test split") and "| validation accuracy |" in text
    for name in ("accuracy_vs_depth.png", "teacher_share.png"):
        assert (sweep / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    collapsed = [r for r in rows if r["role"] == "student" and r["collapsed"]]
    assert sorted(p.name for p in (sweep / "plots").glob("confusion_*.png")) == sorted(f"confusion_{r['run']}.png" for r in collapsed)


def test_a_run_shared_by_cells_counts_once(sweep):
    rows = collect(sweep)
    doubled = rows + [dict(r) for r in rows if r["role"] == "student" and r["policy"] == "teacher"]
    summ = {r["policy"]: r for r in summary(doubled)}
    assert summ["teacher"]["n"] == 3 and summ["teacher"]["of"] == 3


def test_t_quantile_is_exact_beyond_ten_degrees_of_freedom():
    from hpc_kd.report import _t975

    assert _t975(2) == pytest.approx(4.302652729911275)
    assert _t975(14) == pytest.approx(2.1447866879169273)
    assert _t975(30) == pytest.approx(2.0422724563012373)


def fake_row(run, depth, iteration, chain, policy, seed, acc, val):
    return {"role": "student", "depth": depth, "iteration": iteration, "chain": chain, "policy": policy,
            "seed": seed, "tutor_update": None if policy == "teacher" else "online", "metric": "accuracy",
            "test_score": acc, "test_acc": acc, "test_macro_f1": acc, "val_score": val, "val_acc": val,
            "val_macro_f1": val, "teacher_share": None,
            "teacher_batches": None, "collapsed": False, "params": 1, "state": "done", "run": run}


def test_iterations_are_separate_groups_with_their_own_baseline(tmp_path):
    """The paper's grid [[10, 9], [9]]: the iteration-2 9-layer student (chain 10→9) and the
    iteration-1 9-layer student are different models: two groups, each paired with its own KD."""
    rows = []
    for seed in (0, 1):
        rows += [fake_row(f"kd10-{seed}", 10, 1, "10", "teacher", seed, 0.80, 0.81),
                 fake_row(f"kd10-9-{seed}", 9, 2, "10→9", "teacher", seed, 0.70, 0.71),
                 fake_row(f"kd9-{seed}", 9, 1, "9", "teacher", seed, 0.75, 0.76),
                 fake_row(f"ml10-{seed}", 10, 1, "10", "min_loss", seed, 0.81, 0.81),
                 fake_row(f"ml10-9-{seed}", 9, 2, "10→9", "min_loss", seed, 0.74 + seed / 100, 0.70),
                 fake_row(f"ml9-{seed}", 9, 1, "9", "min_loss", seed, 0.73, 0.70)]
    for r in rows:  # the per-example record the bootstrap reads: 100 test sentences
        run = tmp_path / "runs" / r["run"]
        run.mkdir(parents=True)
        correct = [1] * round(100 * r["test_acc"]) + [0] * (100 - round(100 * r["test_acc"]))
        (run / "result.json").write_text(json.dumps({"test": {"correct": correct}}))
    groups = {(r["chain"], r["policy"]): r for r in summary(rows)}
    assert sorted(groups) == sorted((c, p) for c in ("10", "10→9", "9") for p in ("teacher", "min_loss"))
    assert all(r["n"] == 2 for r in groups.values())
    assert groups[("10→9", "min_loss")]["score_mean"] == pytest.approx(0.745)
    assert groups[("9", "min_loss")]["score_mean"] == pytest.approx(0.73)
    paired = {r["chain"]: r for r in paired_vs_kd(tmp_path, rows, split="test") if r["policy"] == "min_loss"}
    assert paired["10→9"]["diff"] == pytest.approx(0.045) and paired["10→9"]["n"] == 2
    assert paired["9"]["diff"] == pytest.approx(-0.02) and paired["9"]["n"] == 2
    assert paired["10"]["diff"] == pytest.approx(0.01)


def test_students_of_two_architectures_at_one_depth_are_two_groups():
    """A grid axis whose values are mappings (student.config) separates groups, pairs each policy
    with the plain KD of its own architecture, and gets a lead column in the summary."""
    from hpc_kd.report import summary, summary_markdown

    narrow = {"hidden_size": 192, "num_attention_heads": 3}
    rows = []
    for config, base in ((None, 0.8), (narrow, 0.6)):
        for policy, update, delta in (("teacher", None, 0.0), ("min_loss", "online", 0.05)):
            rows.append({"role": "student", "run": f"r{len(rows)}", "state": "done", "depth": 6, "config": config,
                         "policy": policy, "tutor_update": update, "seed": 0, "metric": "accuracy",
                         "val_score": base + delta, "test_score": None, "teacher_share": 1.0, "collapsed": False})
    summ = summary(rows)
    assert len(summ) == 4
    assert sorted(round(r["score_mean"], 2) for r in summ) == [0.6, 0.65, 0.8, 0.85]
    text = summary_markdown(summ, [])
    assert "| depth | config | policy | tutor |" in text
    assert "| 6 | hidden_size=192, num_attention_heads=3 | min_loss | online |" in text
    assert "| 6 | – | teacher | – |" in text


def test_a_difference_from_one_seed_is_said_to_rest_on_one_seed():
    from hpc_kd.report import summary_markdown

    row = {"depth": 4, "policy": "min_loss", "tutor_update": "frozen", "axes": [], "n": 1, "split": "test",
           "metric": "token_nll", "diff": -0.05, "t_low": None, "t_high": None, "boot_low": -0.09, "boot_high": -0.01}
    one = summary_markdown([], [row])
    assert "rest on **one seed**" in one and "no difference there is significant" in one
    assert "one seed" not in summary_markdown([], [{**row, "n": 3, "t_low": -0.1, "t_high": 0.0}])


def test_a_language_models_summary_says_token_nll_while_a_group_has_not_finished():
    from hpc_kd.report import summary, summary_markdown

    rows = [{"role": "teacher", "run": "t", "state": "done", "metric": "token_nll"}]
    for i, (policy, state) in enumerate((("teacher", "done"), ("min_loss", "pending"))):
        rows.append({"role": "student", "run": f"r{i}", "state": state, "depth": 4, "policy": policy, "seed": 0,
                     "tutor_update": None if policy == "teacher" else "online", "test_score": None,
                     "metric": "token_nll" if state == "done" else None, "val_score": -6.5 if state == "done" else None,
                     "teacher_share": 1.0 if state == "done" else None, "collapsed": False})
    summ = summary(rows, split="validation")
    assert [r["metric"] for r in summ] == ["token_nll", "token_nll"]
    text = summary_markdown(summ, [])
    assert "Validation token NLL over seeds (mean ± std; lower is better)" in text
    assert "| 4 | min_loss | online | 0 (of 1) | – |" in text
    for r in rows:  # and on test, the validation column of the empty group says nothing
        r["test_score"] = r.get("val_score")
    assert "| 4 | min_loss | online | 0 (of 1) | – | – | – | 0/0 |" in summary_markdown(summary(rows, split="test"), [])
