"""The GLUE protocol: ``glue/<task>`` presets, sentence pairs, regression (STS-B), each task's
metric driving early stopping and the tables, further evaluation splits (MNLI mismatched), and
one table across tasks. Local files stand in for the hub (see ``glue_files``)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hpc_kd.aggregate import collect
from hpc_kd.config import GLUE_TASKS, ConfigError, DataConfig, ExperimentConfig, from_dict
from hpc_kd.launch import main as launch
from hpc_kd.policies import DISTILLING
from hpc_kd.report import cross_task, paired_vs_kd

from .conftest import glue_data, interrupt_and_resume, make_plan, run_plan, strip_times, tiny_config, write_yaml

REPO = Path(__file__).resolve().parents[1]


# -- presets and config ---------------------------------------------------------------------------

def test_a_glue_name_fills_columns_labels_metric_and_splits():
    cfg = from_dict(ExperimentConfig, {"data": {"name": "glue/mnli"}}).data
    assert (cfg.source, cfg.text_column, cfg.text_pair_column, cfg.num_labels, cfg.metric) == \
        ("hf", "premise", "hypothesis", 3, "accuracy")
    assert cfg.validation_split == "validation_matched" and cfg.also_evaluate == ("validation_mismatched",)
    assert cfg.test_split is None  # GLUE's test labels are hidden: validation is the reported split
    stsb = from_dict(ExperimentConfig, {"data": {"name": "glue/stsb"}}).data
    assert stsb.regression and stsb.metric == "pearson_spearman"
    assert from_dict(ExperimentConfig, {"data": {"name": "glue/cola"}}).data.metric == "mcc"
    # what a config sets itself wins over the preset
    own = from_dict(ExperimentConfig, {"data": {"name": "glue/mrpc", "metric": "f1", "max_length": 64}}).data
    assert (own.metric, own.max_length, own.text_pair_column) == ("f1", 64, "sentence2")
    assert set(GLUE_TASKS) >= {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte"}


@pytest.mark.parametrize("data,key,message", [
    ({"name": "glue/mnlii"}, "data.name", "unknown GLUE task 'mnlii'; allowed: glue/cola"),
    ({"name": "glue/stsb", "metric": "mcc"}, "data.metric", "'mcc' does not fit regression"),
    ({"name": "glue/mnli", "metric": "f1"}, "data.metric", "needs 2 classes"),
    ({"num_labels": 2, "metric": "pearson"}, "data.metric", "does not fit 2 classes"),
    ({"name": "glue/stsb", "label_names": ["a"]}, "data.label_names", "regression"),
    ({"name": "glue/sst2", "test_split": "test"}, "data.test_split", "GLUE's 'test' split of glue/sst2 has hidden labels"),
    ({"name": "glue/mnli", "also_evaluate": ["test_mismatched"]}, "data.also_evaluate", "hidden labels (-1 in every row)"),
])
def test_config_errors_name_the_key(data, key, message):
    with pytest.raises(ConfigError) as err:
        from_dict(ExperimentConfig, {"data": data})
    assert err.value.key == key and message in err.value.message


def test_glue_paper_sweep_dry_runs_offline():
    out = subprocess.run([sys.executable, "-m", "hpc_kd.launch", "jobs/glue_paper.yaml", "--dry-run"], cwd=REPO,
                         capture_output=True, text=True, timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                                                                           "HOME": str(Path.home())})
    assert out.returncode == 0, out.stderr[-3000:]
    from hpc_kd.plan import load_plan

    plan = load_plan(REPO / "jobs" / "glue_paper.yaml")
    teachers = [s for s in plan.stages.values() if s.kind == "finetune"]
    assert sorted(t.data.name for t in teachers) == sorted(f"glue/{t}" for t in
                                                         ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte"))
    assert all(t.pretrained == "bert-base-uncased" for t in teachers)
    assert {c.config.data.name for c in plan.cells} == {t.data.name for t in teachers}


# -- data ---------------------------------------------------------------------------------------

def test_pairs_are_tokenised_as_pairs_and_fingerprinted(tiny_model, glue_files, tmp_path):
    from hpc_kd.data import Dataset, load_splits
    from hpc_kd.models import load_tokenizer

    cfg = from_dict(DataConfig, glue_data(glue_files, "mrpc"))
    tok = load_tokenizer(str(tiny_model))
    data = Dataset.build(cfg, tok)
    train = data.encoded["train"]
    sep = tok.sep_token_id
    assert all(int((t == sep).sum()) == 2 for t in train.tokens)  # [CLS] a [SEP] b [SEP]
    assert train.types is not None and all(set(ty.tolist()) == {0, 1} for ty in train.types)
    batch = train.collate(np.arange(4))
    assert batch["token_type_ids"].shape == batch["input_ids"].shape
    assert list(data.encoded) == ["train", "validation", "pair_mismatched"]  # also_evaluate, by file stem
    # the second sentence is part of the content fingerprint (so of every cache's producer)
    frame = pd.read_csv(glue_files["pair_train"])
    frame.loc[0, "sentence2"] = "an entirely different second sentence"
    frame.to_csv(tmp_path / "changed.csv", index=False)
    changed = from_dict(DataConfig, {**glue_data(glue_files, "mrpc"), "train_file": str(tmp_path / "changed.csv")})
    assert load_splits(changed)["train"].fingerprint() != load_splits(cfg)["train"].fingerprint()


def test_regression_labels_are_real_numbers_checked_by_row(glue_files, tmp_path):
    from hpc_kd.data import check_data, load_splits

    cfg = from_dict(DataConfig, glue_data(glue_files, "stsb"))
    labels = load_splits(cfg)["train"].labels
    assert labels.dtype == np.float64 and labels.min() >= 0 and labels.max() < 5.5 and not np.all(labels == labels.round())
    frame = pd.read_csv(glue_files["sts_train"])
    for value, message in (("high", "label 'high' is not a finite number"), ("", "the label is missing")):
        bad = frame.astype({"label": object})
        bad.loc[2, "label"] = value
        bad.to_csv(tmp_path / "bad.csv", index=False)
        with pytest.raises(ConfigError) as err:
            check_data(from_dict(DataConfig, {**glue_data(glue_files, "stsb"), "train_file": str(tmp_path / "bad.csv")}))
        assert "bad.csv, row 3 (line 4)" in err.value.message and message in err.value.message
    frame.assign(label=2.0).to_csv(tmp_path / "flat.csv", index=False)
    with pytest.raises(ConfigError, match="cannot learn from one value"):
        check_data(from_dict(DataConfig, {**glue_data(glue_files, "stsb"), "train_file": str(tmp_path / "flat.csv")}))


def test_a_split_of_hidden_labels_is_refused(tmp_path):
    from hpc_kd.data import check_data

    (tmp_path / "train.csv").write_text("text,label\ngood,1\nbad,0\n")
    (tmp_path / "test.csv").write_text("text,label\ngood,-1\nbad,-1\n")
    with pytest.raises(ConfigError, match="test.csv: every label is -1, the mark of a hidden"):
        check_data(DataConfig(source="local", train_file=str(tmp_path / "train.csv"),
                              validation_file=str(tmp_path / "train.csv"), test_file=str(tmp_path / "test.csv")))


def test_a_missing_second_sentence_column_names_the_key(glue_files):
    from hpc_kd.data import check_data

    with pytest.raises(ConfigError) as err:
        check_data(from_dict(DataConfig, {**glue_data(glue_files, "mrpc"), "text_pair_column": "sentence3"}))
    assert err.value.key == "data.text_pair_column" and "'sentence3' not in" in err.value.message


# -- end to end: teacher -> cache -> tutor -> TEID student, resumed ----------------------------

@pytest.mark.parametrize("task,metric", [("mrpc", "f1_accuracy"), ("stsb", "pearson_spearman")])
def test_a_task_runs_the_chain_and_resumes_to_identical_results(tiny_model, glue_files, tmp_path, task, metric):
    sections = {"data": glue_data(glue_files, task)}
    ref_plan = make_plan(tiny_model, tmp_path / "ref", **sections)
    reference = run_plan(ref_plan)
    student_key = list(ref_plan.stages)[-1]
    res = reference[student_key]
    assert [s.kind for s in ref_plan.stages.values()] == ["finetune", "cache", "distill", "distill"]
    assert res["kind"] == "teid" and res["validation"]["metric"] == metric
    assert res["selection"]["examples"] == 2 * 96  # two epochs, every example selected once each
    cache = next(s for s in ref_plan.stages.values() if s.kind == "cache")
    manifest = json.loads((cache.folder(ref_plan.root) / "manifest.json").read_text())
    assert manifest["num_labels"] == (1 if task == "stsb" else 2)
    if task == "mrpc":  # the further evaluation split is reported beside validation
        assert res["pair_mismatched"]["n"] == 32 and res["pair_mismatched"]["metric"] == metric
    else:  # one output, squared errors; predictions are real numbers
        assert set(res["validation"]) >= {"pearson", "spearman", "mse", "pred", "labels"}
        assert "correct" not in res["validation"] and "accuracy" not in res["validation"]
    # the task's metric picked the best epoch
    run = ref_plan.stages[student_key].run_dir(ref_plan.root)
    epochs = [m for m in run.metrics() if m["type"] == "epoch"]
    best = max(range(len(epochs)), key=lambda i: (epochs[i][f"val_{metric}"], -i))
    assert res["best_epoch"] == best and res["validation"]["score"] == pytest.approx(epochs[best][f"val_{metric}"])

    plan = make_plan(tiny_model, tmp_path / "resumed", **sections)
    resumed = interrupt_and_resume(plan, student_key, 7)
    assert strip_times(resumed) == strip_times(res)
    assert plan.stages[student_key].run_dir(plan.root).metrics() == run.metrics()


@pytest.fixture(scope="module")
def regression_root(tmp_path_factory):
    return tmp_path_factory.mktemp("regression_policies")


@pytest.mark.parametrize("policy", DISTILLING)
def test_every_policy_trains_a_regression(tiny_model, glue_files, regression_root, policy):
    """Every policy is defined for one output (teacher, tutor and cache shared between them)."""
    plan = make_plan(tiny_model, regression_root, data=glue_data(glue_files, "stsb"),
                     student={"train": {"lr": 1e-3, "batch_size": 16, "epochs": 1}}, distill={"policy": policy})
    result = run_plan(plan)[list(plan.stages)[-1]]
    assert np.isfinite(result["validation"]["score"]) and result["validation"]["metric"] == "pearson_spearman"
    if policy != "teacher":
        sel = result["selection"]
        assert sel["teacher_batches"] + sel["tutor_batches"] + sel["mixed_batches"] == result["steps"]


def test_correct_first_and_ensemble_on_one_output():
    import torch

    from hpc_kd.policies import Selection, make_policy

    labels = torch.tensor([1.0, 4.0, 2.0])
    z_t, z_u = torch.tensor([[1.2], [3.0], [2.5]]), torch.tensor([[0.5], [3.5], [1.5]])
    sel = Selection(torch.tensor([0.1, 0.9, 0.3]), torch.tensor([0.2, 0.1, 0.3]), torch.zeros(3, 1), z_t, z_u, labels, 0, 10, kind="regression")
    # closer to the gold value first; equally close (the third): the lower loss, ties to the tutor
    assert make_policy("correct_first").select(sel).tolist() == [1.0, 0.0, 0.0]
    assert make_policy("ensemble").select(sel).tolist() == [0.5, 0.5, 0.5]


# -- one table across tasks ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_task_sweep(tiny_model, glue_files, tmp_path_factory):
    root = tmp_path_factory.mktemp("glue_sweep")
    base = tiny_config(tiny_model, root, student={"layers": [2], "train": {
        "lr": 1e-3, "batch_size": 16, "epochs": 1}})
    base["data"] = {**base["data"], **glue_data(glue_files, "mrpc")}

    def part(task):
        d = glue_data(glue_files, task)
        return {"data.name": [d["name"]], "data.train_file": [d["train_file"]], "data.validation_file": [d["validation_file"]],
                "data.also_evaluate": [d.get("also_evaluate", [])], "distill.policy": ["teacher", "min_loss"], "seed": [0, 1]}

    base["grid"] = [part("mrpc"), part("stsb")]
    assert launch([str(write_yaml(root / "s.yaml", base)), "--executor", "debug"]) == 0
    return root / "t"


def test_the_cross_task_table_has_a_column_per_task_and_the_average(two_task_sweep):
    rows = collect(two_task_sweep)
    table = cross_task(rows)
    columns = ["MRPC F1", "MRPC acc", "STS-B Pearson", "STS-B Spearman"]  # a combined metric's parts
    assert table["split"] == "validation" and table["columns"] == columns
    assert table["average"] == "GLUE dev average over 2 tasks"  # never "the GLUE score"
    students = {(r["task"], r["policy"], r["seed"]): r for r in rows if r["role"] == "student"}
    assert len(students) == 8 and {r["metric"] for r in students.values()} == {"f1_accuracy", "pearson_spearman"}
    group = next(g for g in table["groups"] if g["role"] == "student" and g["policy"] == "min_loss")
    for title, task, key in (("MRPC F1", "glue/mrpc", "val_f1"), ("MRPC acc", "glue/mrpc", "val_acc"),
                             ("STS-B Pearson", "glue/stsb", "val_pearson"), ("STS-B Spearman", "glue/stsb", "val_spearman")):
        assert sorted(group["cells"][title]) == sorted(students[(task, "min_loss", s)][key] for s in (0, 1))
    for s in (0, 1):  # the parts make up the score
        mrpc, stsb = students[("glue/mrpc", "min_loss", s)], students[("glue/stsb", "min_loss", s)]
        assert mrpc["val_score"] == pytest.approx((mrpc["val_f1"] + mrpc["val_acc"]) / 2)
        assert stsb["val_score"] == pytest.approx((stsb["val_pearson"] + stsb["val_spearman"]) / 2)
    assert group["average"] == pytest.approx([(students[("glue/mrpc", "min_loss", s)]["val_score"]
                                               + students[("glue/stsb", "min_loss", s)]["val_score"]) / 2 for s in (0, 1)])
    teachers = [g for g in table["groups"] if g["role"] == "teacher"]
    assert len(teachers) == 1 and set(teachers[0]["cells"]) == set(columns)
    summary = (two_task_sweep / "summary.md").read_text()
    assert "### All tasks (validation" in summary and "| STS-B Spearman | GLUE dev average over 2 tasks |" in summary
    assert "GLUE score" not in summary
    assert "### Difference to plain KD per task" in summary and "| 2 | 2 | min_loss | online | " in summary
    assert (two_task_sweep / "plots" / "accuracy_vs_depth_glue_stsb.png").exists()


def test_the_average_is_named_for_what_it_is():
    from hpc_kd.report import average_label

    assert average_label(["glue/mrpc", "glue/stsb"], "validation") == "GLUE dev average over 2 tasks"
    assert average_label(["glue/mrpc", "my_task"], "validation") == "average over 2 tasks (1 not from GLUE: my_task)"


def test_paired_differences_are_per_task_on_its_metric(two_task_sweep):
    rows = collect(two_task_sweep)
    paired = {r["task"]: r for r in paired_vs_kd(two_task_sweep, rows, n_boot=300)}
    assert set(paired) == {"glue/mrpc", "glue/stsb"}
    students = {(r["task"], r["policy"], r["seed"]): r for r in rows if r["role"] == "student"}
    for task, row in paired.items():
        diffs = [students[(task, "min_loss", s)]["val_score"] - students[(task, "teacher", s)]["val_score"] for s in (0, 1)]
        assert row["diff"] == pytest.approx(np.mean(diffs)) and row["n"] == 2
        assert row["boot_low"] is not None and row["boot_low"] <= row["boot_high"]
