"""End-to-end training on the tiny model: fine-tuning, KD, TEID, selection bookkeeping, resume,
determinism and the iteration chain."""
import hashlib
import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from hpc_kd.stages import ModelRef

from hpc_kd.rundir import RunDir

from .conftest import interrupt_and_resume, make_plan, run_plan, strip_times


def params_hash(model) -> str:
    h = hashlib.sha1()
    for p in model.parameters():
        h.update(p.detach().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def teid_run(tiny_model, tmp_path_factory):
    """One TEID (min_loss, online tutor) chain, recording per-step what happened to the tutor."""
    plan = make_plan(tiny_model, tmp_path_factory.mktemp("teid"))
    steps = []
    state = {}

    def hook(trainer, record):
        tutor = trainer.task.tutor
        if tutor is None:
            return
        now = params_hash(tutor.model)
        steps.append({**record, "tutor_changed": now != state.get("last", state.setdefault("first", None))})
        state["last"] = now

    # Record the tutor's parameters before the TEID student's first step.
    *upstream, student_key = plan.stages
    run_plan(plan, only=upstream)
    from hpc_kd.models import load_classifier
    state["last"] = params_hash(load_classifier(plan.stages[student_key].tutor.path(plan.root)))
    run_plan(plan, on_step=hook, only=[student_key])
    return plan, steps


def test_chain_produces_models_that_load_with_transformers(teid_run):
    plan, _ = teid_run
    for key, stage in plan.stages.items():
        run = stage.run_dir(plan.root)
        assert run.done() and (run.path / "config.json").is_file() and not run.checkpoint.exists()
        if stage.kind == "cache":
            assert (run.path / "logits" / "manifest.json").is_file()
            continue
        model = AutoModelForSequenceClassification.from_pretrained(run.path / "model")
        assert model.config.num_hidden_layers == run.result()["layers"]
        config = json.loads((run.path / "config.json").read_text())
        assert config["signature"] == stage.signature and config["key"] == key


def test_teid_selection_counts_sum_to_batches(teid_run):
    plan, steps = teid_run
    student = list(plan.stages.values())[-1]
    result = student.run_dir(plan.root).result()
    assert result["kind"] == "teid"
    per_epoch = result["selection_per_epoch"]
    batches_per_epoch = -(-96 // 16)
    assert len(per_epoch) == result["epochs_run"] == 2
    for counts in per_epoch:
        assert counts["teacher_batches"] + counts["tutor_batches"] + counts["mixed_batches"] == batches_per_epoch
        assert counts["mixed_batches"] == 0  # min_loss decides per batch
        assert counts["examples"] == 96
    teacher_steps = sum(1 for s in steps if s["teacher_weight"] == 1.0)
    assert result["selection"]["teacher_batches"] == teacher_steps
    assert len(steps) == result["steps"] == 2 * batches_per_epoch


def test_tutor_changes_only_when_the_teacher_is_selected(teid_run):
    _, steps = teid_run
    assert any(s["teacher_weight"] == 1.0 for s in steps) and any(s["teacher_weight"] == 0.0 for s in steps)
    for s in steps:
        assert s["tutor_updated"] == (s["teacher_weight"] == 1.0)
        assert s["tutor_changed"] == s["tutor_updated"], s


def test_online_tutor_is_saved_and_evaluated(teid_run):
    plan, _ = teid_run
    student = list(plan.stages.values())[-1]
    run = student.run_dir(plan.root)
    assert (run.path / "tutor" / "model.safetensors").is_file()
    assert "tutor_validation" in run.result()


def test_metrics_records(teid_run):
    plan, _ = teid_run
    student = list(plan.stages.values())[-1]
    metrics = student.run_dir(plan.root).metrics()
    epochs = [m for m in metrics if m["type"] == "epoch"]
    assert [m["epoch"] for m in epochs] == [0, 1]
    assert all("selection" in m and "val_accuracy" in m for m in epochs)
    assert [m["step"] for m in metrics if m["type"] == "train"] == [2, 4, 6, 8, 10, 12]


@pytest.mark.parametrize("policy,stop_after", [("min_loss", 7), ("teacher", 3)])
def test_resume_after_interruption_gives_identical_metrics(tiny_model, tmp_path, policy, stop_after):
    """Kill the student mid-epoch (after step 7 of 12, last checkpoint at step 6), resume, compare."""
    sections = {"distill": {"policy": policy}}
    ref_plan = make_plan(tiny_model, tmp_path / "ref", **sections)
    reference = run_plan(ref_plan)

    plan = make_plan(tiny_model, tmp_path / "resumed", **sections)
    student_key = list(plan.stages)[-1]
    resumed = interrupt_and_resume(plan, student_key, stop_after)
    run = plan.stages[student_key].run_dir(plan.root)
    assert strip_times(resumed) == strip_times(reference[student_key])
    ref_run = ref_plan.stages[student_key].run_dir(ref_plan.root)
    assert run.metrics() == ref_run.metrics()
    assert (run.path / "model" / "model.safetensors").read_bytes() == (ref_run.path / "model" / "model.safetensors").read_bytes()


def test_same_config_and_seed_give_the_same_metrics(tiny_model, tmp_path):
    a = run_plan(make_plan(tiny_model, tmp_path / "a", distill={"policy": "teacher"}))
    b = run_plan(make_plan(tiny_model, tmp_path / "b", distill={"policy": "teacher"}))
    assert [strip_times(r) for r in a.values()] == [strip_times(r) for r in b.values()]
    # another student seed reuses the teacher and tutor (their own seeds) but is another run
    c = make_plan(tiny_model, tmp_path / "c", distill={"policy": "teacher"}, seed=1)
    assert list(c.stages)[:-1] == list(a)[:-1] and list(c.stages)[-1] != list(a)[-1]


def test_early_stopping_keeps_the_best_epoch(tiny_model, tmp_path):
    # A vanishing learning rate: accuracy cannot improve after the first epoch -> stop at patience.
    plan = make_plan(tiny_model, tmp_path, teacher={"train": {"lr": 1e-12, "batch_size": 16, "epochs": 5, "patience": 2}})
    teacher = next(iter(plan.stages.values()))
    result = teacher(plan.root, plan.run)
    assert result["best_epoch"] == 0 and result["epochs_run"] == 3
    epochs = [m for m in teacher.run_dir(plan.root).metrics() if m["type"] == "epoch"]
    assert [m["improved"] for m in epochs] == [True, False, False]
    assert result["validation"]["accuracy"] == epochs[0]["val_accuracy"]


def test_iteration_chain_wiring(tiny_model, tmp_path):
    plan = make_plan(tiny_model, tmp_path, student={"layers": [2, 1]})
    teacher, tutor, s1, s2 = [s for s in plan.stages.values() if s.kind != "cache"]
    assert s1.teacher == ModelRef(teacher.key) and s1.tutor == ModelRef(tutor.key)
    # iteration 2: the (updated) tutor becomes the teacher, the student becomes the tutor
    assert s2.teacher == ModelRef(s1.key, "tutor") and s2.tutor == ModelRef(s1.key)
    assert (s1.layers, s2.layers, s2.iteration) == (2, 1, 2)
    frozen = make_plan(tiny_model, tmp_path, student={"layers": [2, 1]}, distill={"tutor_update": "frozen"})
    _, tutor_f, s1f, s2f = [s for s in frozen.stages.values() if s.kind != "cache"]
    assert s2f.teacher == ModelRef(tutor_f.key) and s2f.tutor == ModelRef(s1f.key)
    kd = make_plan(tiny_model, tmp_path, student={"layers": [2]}, distill={"policy": "teacher"})
    assert list(kd.stages.values())[-1].tutor is None


def test_signature_ignores_operational_settings(tiny_model, tmp_path):
    a = make_plan(tiny_model, tmp_path, run={"checkpoint_every": 5, "progress": True})
    b = make_plan(tiny_model, tmp_path / "x", run={"checkpoint_every": 7})
    assert list(a.stages) == list(b.stages)
    c = make_plan(tiny_model, tmp_path, distill={"tau": 3.0})
    # tau changes the tutor and students, not the teacher nor its cache
    assert list(a.stages)[:2] == list(c.stages)[:2] and list(a.stages)[2:] != list(c.stages)[2:]


def test_frozen_embeddings_stay_as_built_and_change_only_the_trained_stages_key(tiny_model, tmp_path):
    def student_embeddings(freeze: bool):
        train = {"lr": 1e-3, "batch_size": 16, "epochs": 1, "freeze_embeddings": freeze}
        plan = make_plan(tiny_model, tmp_path, distill={"policy": "teacher"}, student={"train": train})
        *upstream, student = plan.stages
        run_plan(plan, only=upstream)
        seen = []
        run_plan(plan, only=[student], on_step=lambda trainer, record: seen.append(
            (trainer.student.model.get_input_embeddings().weight.detach().clone(), params_hash(trainer.student.model))))
        return list(plan.stages), seen

    keys, trained = student_embeddings(False)
    frozen_keys, frozen = student_embeddings(True)
    assert frozen_keys[:-1] == keys[:-1] and frozen_keys[-1] != keys[-1]  # the default is left out of keys
    assert len(frozen) > 1 and torch.equal(frozen[0][0], frozen[-1][0]) and frozen[0][1] != frozen[-1][1]
    assert not torch.equal(trained[0][0], trained[-1][0])


def test_the_no_teacher_baseline_is_plain_kd_at_alpha_zero_without_its_cache_or_tutor(tiny_model, tmp_path):
    student = {"train": {"lr": 1e-3, "batch_size": 16, "epochs": 1}}
    kd = make_plan(tiny_model, tmp_path, distill={"policy": "teacher", "alpha": 0.0}, student=student)
    none = make_plan(tiny_model, tmp_path, distill={"policy": "none", "tau": 3.0}, student=student)
    assert [s.kind for s in none.stages.values()] == ["finetune", "distill"]
    assert list(none.stages)[0] == list(kd.stages)[0]
    baseline = list(none.stages.values())[-1]
    assert (baseline.teacher_cache, baseline.tutor, baseline.alpha, baseline.tau) == (None, None, 0.0, 1.0)
    # tau, alpha and the divergence do not matter to it: one run serves every cell
    assert list(make_plan(tiny_model, tmp_path, distill={"policy": "none"}, student=student).stages) == list(none.stages)
    results = run_plan(kd)
    ours = run_plan(none)[baseline.key]
    theirs = results[list(kd.stages)[-1]]
    assert ours["kind"] == "finetune" and "selection" not in ours and ours["targets"] is None
    # the same gold loss on the same batches from the same start: the same student
    assert ours["validation"]["pred"] == theirs["validation"]["pred"]
    assert ours["test"]["macro_f1"] == pytest.approx(theirs["test"]["macro_f1"])


def test_checkpoint_holds_no_pickled_objects(tiny_model, tmp_path):
    plan = make_plan(tiny_model, tmp_path)
    teacher = next(iter(plan.stages.values()))

    class Stop(Exception):
        pass

    def stop(trainer, record):
        if trainer.p.step == 2:
            raise Stop

    with pytest.raises(Stop):
        teacher(plan.root, plan.run, on_step=stop)
    state = torch.load(teacher.run_dir(plan.root).checkpoint, weights_only=True)
    assert state["progress"]["step"] == 2


@pytest.mark.parametrize("policy", ["min_loss_sample", "normalized", "correct_first", "anneal", "ensemble", "bandit"])
def test_every_policy_trains_and_reports_shares(tiny_model, tmp_path, policy):
    plan = make_plan(tiny_model, tmp_path, student={"train": {"lr": 1e-3, "batch_size": 16, "epochs": 1}},
                     distill={"policy": policy, "tutor_update": "frozen", "bandit_probe": 16})
    results = run_plan(plan)
    student = results[list(plan.stages)[-1]]
    sel = student["selection"]
    assert 0.0 <= sel["teacher_share"] <= 1.0
    examples = 96 - (16 if policy == "bandit" else 0)  # the bandit's probe slice is held out
    assert sel["examples"] == examples
    assert sel["teacher_batches"] + sel["tutor_batches"] + sel["mixed_batches"] == -(-examples // 16)
    epochs = [m for m in list(plan.stages.values())[-1].run_dir(plan.root).metrics() if m["type"] == "epoch"]
    assert epochs[0]["selection"]["teacher_share"] == pytest.approx(sel["teacher_share"])


@pytest.mark.parametrize("policy", ["bandit", "normalized"])
def test_stateful_policies_resume_identically(tiny_model, tmp_path, policy):
    sections = {"distill": {"policy": policy, "bandit_probe": 16}}
    ref_plan = make_plan(tiny_model, tmp_path / "ref", **sections)
    reference = run_plan(ref_plan)
    plan = make_plan(tiny_model, tmp_path / "resumed", **sections)
    student_key = list(plan.stages)[-1]
    states = []
    original_load = RunDir.load_checkpoint

    def spy(self):
        state = original_load(self)
        states.append(state)
        return state

    RunDir.load_checkpoint = spy
    try:
        resumed = interrupt_and_resume(plan, student_key, 7)
    finally:
        RunDir.load_checkpoint = original_load
    assert states[-1] is not None and states[-1]["policy"]  # the policy's state came back from the checkpoint
    assert strip_times(resumed) == strip_times(reference[student_key])


def test_students_can_start_from_the_pretrained_encoder(tiny_model, tmp_path):
    plan = make_plan(tiny_model, tmp_path, student={"layers": [2], "init": "first", "init_from": "pretrained",
                                                    "train": {"lr": 1e-3, "batch_size": 16, "epochs": 1}})
    student = list(plan.stages.values())[-1]
    assert student.init_from == str(tiny_model)
    result = run_plan(plan)[student.key]
    assert result["layers"] == 2


def tutor_steps(tiny_model, root, policy: str, **distill) -> tuple[list[dict], object]:
    """Run a chain whose student has an online tutor; return the student's step records and stage."""
    plan = make_plan(tiny_model, root, distill={"policy": policy, **distill},
                     tutor={"train": {"lr": 1e-3, "batch_size": 16, "epochs": 2, "warmup_ratio": 0.5}})
    records = []
    *upstream, student_key = plan.stages
    run_plan(plan, only=upstream)
    run_plan(plan, on_step=lambda t, r: records.append(r), only=[student_key])
    return records, plan.stages[student_key]


def test_online_tutor_rate_is_the_schedule_at_the_students_step(tiny_model, tmp_path):
    """The teacher wins only the second half of the run (anneal, step shape): the tutor's first
    update, at step 6 of 12, uses the rate its schedule gives at step 6 (here the peak after a
    6-step warm-up), not the first step of its warm-up (lr / 7, what stepping the schedule once
    per tutor update gave)."""
    from hpc_kd.loop import linear_schedule

    records, student = tutor_steps(tiny_model, tmp_path, "anneal", anneal_shape="step")
    schedule = linear_schedule(student.tutor_train, 12)
    updated = [r for r in records if r["tutor_updated"]]
    assert [r["step"] for r in updated] == list(range(6, 12))
    assert [r["tutor_rate"] for r in updated] == pytest.approx([1e-3 * schedule(s) for s in range(6, 12)])
    assert updated[0]["tutor_rate"] == pytest.approx(1e-3)


@pytest.mark.parametrize("policy", ["min_loss_sample", "anneal", "ensemble"])
def test_tutor_step_is_scaled_by_the_teachers_share(tiny_model, tmp_path, policy):
    """Per-example and mixing policies: the tutor steps when the teacher has any weight, with a
    rate scaled by the teacher's share of the batch (no share, no step)."""
    from hpc_kd.loop import linear_schedule

    records, student = tutor_steps(tiny_model, tmp_path, policy)
    schedule = linear_schedule(student.tutor_train, 12)
    for r in records:
        assert r["tutor_updated"] == (r["teacher_weight"] > 0)
        if r["tutor_updated"]:
            assert r["tutor_rate"] == pytest.approx(1e-3 * schedule(r["step"]) * r["teacher_weight"])
    shares = {round(r["teacher_weight"], 6) for r in records if r["tutor_updated"]}
    assert len(shares) > 1 and min(shares) < 1.0  # partial shares occurred, and were scaled


@pytest.mark.parametrize("loss,args", [("reverse_kl", None), ("jsd", {"beta": 0.3}), ("skew_reverse_kl", {"lam": 0.1}),
                                       ("tv", None)])
def test_every_divergence_trains_the_chain_and_its_parameter_is_in_the_signature(tiny_model, tmp_path, loss, args):
    distill = {"loss": loss, "jsd_beta": 0.3}
    student_cfg = {"train": {"lr": 1e-3, "batch_size": 16, "epochs": 1}}
    plan = make_plan(tiny_model, tmp_path, distill=distill, student=student_cfg)
    student = plan.stages[list(plan.stages)[-1]]
    assert student.loss_args == args and student.settings().get("loss_args") == args
    result = run_plan(plan)[student.key]
    assert result["kind"] == "teid" and result["selection"]["examples"] == 96
    other = make_plan(tiny_model, tmp_path, distill={**distill, "jsd_beta": 0.7}, student=student_cfg)
    assert (list(other.stages)[-1] != student.key) == (loss == "jsd")  # only the chosen term's key counts
