"""The logit cache: format, validation (every corruption detected), rebuild, restart, ranks,
and equivalence of cached and live targets."""
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from hpc_kd.cache import CacheError, LogitCache, finalize, producer, write_cache, write_rank
from hpc_kd.config import DataConfig, RunConfig
from hpc_kd.data import Dataset
from hpc_kd.models import load_classifier, load_pretrained, load_tokenizer, save_model

from .conftest import interrupt_and_resume, make_plan, run_plan, strip_times

DATA = DataConfig(max_train_examples=96, max_eval_examples=48, max_length=24)


@pytest.fixture(scope="module")
def setup(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    tok = load_tokenizer(str(tiny_model))
    model_dir = root / "model"
    save_model(load_pretrained(str(tiny_model), 2, seed=0), tok, model_dir)
    dataset = Dataset.build(DATA, tok)
    prod = producer(model_dir, DATA.max_length, "embedded:rotten_tomatoes", "train", dataset.fingerprints["train"])
    return root, model_dir, dataset, prod


def fresh_cache(setup, name, **kw):
    root, model_dir, dataset, prod = setup
    folder = root / name
    shutil.rmtree(folder, ignore_errors=True)
    write_cache(folder, load_classifier(model_dir), dataset.encoded["train"], prod, 2, rows_per_shard=40, **kw)
    return folder


def test_format_and_manifest(setup):
    root, model_dir, dataset, prod = setup
    folder = fresh_cache(setup, "fmt")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["schema"] == 1 and manifest["producer"] == prod and manifest["total_rows"] == 96
    assert [s["rows"] for s in manifest["shards"]] == [40, 40, 16]
    assert manifest["bytes"] == sum((folder / s["file"]).stat().st_size for s in manifest["shards"])
    table = pq.read_table(folder / manifest["shards"][0]["file"])
    assert str(table.schema.field("example_id").type) == "int64"
    assert str(table.schema.field("logits").type) == "fixed_size_list<element: float>[2]"
    all_ids = np.concatenate([pq.read_table(folder / s["file"]).column("example_id").to_numpy() for s in manifest["shards"]])
    assert (np.diff(all_ids) > 0).all() and sorted(all_ids) == sorted(dataset.encoded["train"].ids)
    assert set(prod) == {"weights", "tokenizer", "max_length", "dataset", "split", "data"}


def test_cached_logits_equal_the_live_model(setup):
    root, model_dir, dataset, prod = setup
    cache = LogitCache.open(fresh_cache(setup, "eq"), prod, dataset.encoded["train"].ids)
    model = load_classifier(model_dir).eval()
    enc = dataset.encoded["train"]
    index = np.array([5, 0, 17, 95])
    batch = enc.collate(index)
    with torch.no_grad():
        live = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(cache.logits(batch["example_ids"]), live, atol=1e-6)


def corrupt_truncate(folder, manifest):
    path = folder / manifest["shards"][1]["file"]
    path.write_bytes(path.read_bytes()[:-100])


def corrupt_missing(folder, manifest):
    (folder / manifest["shards"][2]["file"]).unlink()


def corrupt_flip(folder, manifest):
    path = folder / manifest["shards"][0]["file"]
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF
    path.write_bytes(bytes(data))


def corrupt_manifest_rows(folder, manifest):
    manifest["total_rows"] += 1
    (folder / "manifest.json").write_text(json.dumps(manifest))


def corrupt_no_manifest(folder, manifest):
    (folder / "manifest.json").unlink()


def corrupt_manifest_cut(folder, manifest):
    text = (folder / "manifest.json").read_text()
    (folder / "manifest.json").write_text(text[: len(text) // 2])


def corrupt_manifest_no_shards(folder, manifest):
    del manifest["shards"]
    (folder / "manifest.json").write_text(json.dumps(manifest))


def corrupt_manifest_not_a_mapping(folder, manifest):
    (folder / "manifest.json").write_text("[1, 2]")


def corrupt_manifest_id_range(folder, manifest):
    manifest["shards"][1]["min_id"] += 1
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("corrupt,needle", [
    (corrupt_manifest_cut, "manifest.json cannot be read or lacks a field .JSONDecodeError"),
    (corrupt_manifest_no_shards, "manifest.json cannot be read or lacks a field .KeyError: 'shards'"),
    (corrupt_manifest_not_a_mapping, "manifest.json cannot be read or lacks a field .TypeError"),
    (corrupt_manifest_id_range, "holds ids .* manifest says"),
    (corrupt_truncate, "fails its checksum"),
    (corrupt_missing, "is missing"),
    (corrupt_flip, "fails its checksum"),
    (corrupt_manifest_rows, "manifest says"),
    (corrupt_no_manifest, "no manifest.json"),
])
def test_damaged_caches_are_detected(setup, corrupt, needle):
    root, model_dir, dataset, prod = setup
    folder = fresh_cache(setup, "bad")
    corrupt(folder, json.loads((folder / "manifest.json").read_text()))
    with pytest.raises(CacheError, match=needle):
        LogitCache.open(folder, prod, dataset.encoded["train"].ids)


@pytest.mark.parametrize("field,value", [
    ("weights", "0" * 16), ("tokenizer", "f" * 16), ("max_length", 32),
    ("dataset", "hf:glue/sst2"), ("data", "0123456789abcdef"),
])
def test_a_cache_from_another_producer_is_refused(setup, field, value):
    root, model_dir, dataset, prod = setup
    folder = fresh_cache(setup, "other")
    with pytest.raises(CacheError, match=f"different {field}"):
        LogitCache.open(folder, {**prod, field: value}, dataset.encoded["train"].ids)


def test_ids_not_covered_are_refused(setup, tiny_model):
    root, model_dir, dataset, prod = setup
    folder = fresh_cache(setup, "cover")
    more = Dataset.build(DataConfig(max_train_examples=120, max_length=24), load_tokenizer(str(tiny_model)))
    with pytest.raises(CacheError, match="have no cached logits"):
        LogitCache.open(folder, prod, more.encoded["train"].ids)


def test_a_restarted_cache_job_keeps_valid_shards(setup):
    root, model_dir, dataset, prod = setup
    folder = fresh_cache(setup, "restart")
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").unlink()  # as if killed before the manifest
    shards = [folder / s["file"] for s in manifest["shards"]]
    stamps = [p.stat().st_mtime_ns for p in shards]
    shards[1].unlink()
    write_cache(folder, load_classifier(model_dir), dataset.encoded["train"], prod, 2, rows_per_shard=40)
    assert shards[0].stat().st_mtime_ns == stamps[0] and shards[2].stat().st_mtime_ns == stamps[2]
    assert json.loads((folder / "manifest.json").read_text()) == manifest
    # a shard from another producer is not kept
    other = {**prod, "weights": "x" * 16}
    write_cache(folder, load_classifier(model_dir), dataset.encoded["train"], other, 2, rows_per_shard=40)
    assert shards[0].stat().st_mtime_ns != stamps[0]


def test_two_ranks_write_one_manifest_equal_to_one_rank(setup):
    root, model_dir, dataset, prod = setup
    one = LogitCache.open(fresh_cache(setup, "one"), prod, dataset.encoded["train"].ids)
    folder = root / "two"
    shutil.rmtree(folder, ignore_errors=True)
    for rank in (0, 1):
        write_rank(folder, load_classifier(model_dir), dataset.encoded["train"], prod, 2, rows_per_shard=40,
                   rank=rank, world_size=2)
    manifest = finalize(folder, prod, 2, world_size=2)
    assert {s["rank"] for s in manifest["shards"]} == {0, 1} and manifest["total_rows"] == 96
    two = LogitCache.open(folder, prod, dataset.encoded["train"].ids)
    assert np.array_equal(one.ids, two.ids)
    # equal up to float rounding: ranks batch (and so pad) examples differently
    assert torch.allclose(one.logits_table, two.logits_table, atol=1e-6, rtol=0)


# ---- stages: equivalence of cached and live targets, rebuild of a damaged cache ---------------

def losses_of(plan, key):
    return [m["loss"] for m in plan.stages[key].run_dir(plan.root).metrics() if m["type"] == "train"]


def students(plan):
    return [k for k, s in plan.stages.items() if s.role == "student"]


@pytest.mark.parametrize("distill", [
    {"policy": "teacher"},                              # classic KD
    {"policy": "min_loss", "tutor_update": "frozen"},   # TEID with a frozen tutor
])
def test_cached_targets_match_live_targets(tiny_model, tmp_path, distill):
    cached = make_plan(tiny_model, tmp_path / "c", distill={**distill, "targets": "cache"})
    live = make_plan(tiny_model, tmp_path / "l", distill={**distill, "targets": "live"})
    rc, rl = run_plan(cached), run_plan(live)
    assert any(s.kind == "cache" for s in cached.stages.values())
    assert not any(s.kind == "cache" for s in live.stages.values())
    (kc,), (kl,) = students(cached), students(live)
    assert rc[kc]["targets"] == "cache" and rl[kl]["targets"] == "live"
    # cached logits come from length-sorted batches of 128, live ones from training batches: other
    # padding, other kernel blocking, so equal up to float rounding (not bit for bit on every CPU)
    assert np.allclose(losses_of(cached, kc), losses_of(live, kl), atol=1e-6, rtol=1e-5)
    for split in ("validation", "test"):
        for metric in ("accuracy", "macro_f1"):
            assert rc[kc][split][metric] == pytest.approx(rl[kl][split][metric], abs=1e-6)
        assert rc[kc][split]["confusion"] == rl[kl][split]["confusion"]
    if "selection" in rc[kc]:
        assert rc[kc]["selection"] == rl[kl]["selection"]


def test_damaged_cache_is_rebuilt_by_its_producer(tiny_model, tmp_path):
    plan = make_plan(tiny_model, tmp_path, distill={"policy": "teacher"})
    run_plan(plan)
    cache = next(s for s in plan.stages.values() if s.kind == "cache")
    manifest = json.loads((cache.folder(plan.root) / "manifest.json").read_text())
    corrupt_flip(cache.folder(plan.root), manifest)
    tok = load_tokenizer(str(cache.model.path(plan.root)))
    loaded = cache.load(plan.root, Dataset.build(cache.data, tok), RunConfig(progress=False))
    assert loaded.manifest["shards"] == manifest["shards"]  # rebuilt, byte-identical


def test_refresh_mode_rebuilds_the_tutor_cache_each_epoch_and_resumes(tiny_model, tmp_path):
    sections = {"distill": {"policy": "min_loss", "tutor_update": "refresh"}}
    plan = make_plan(tiny_model, tmp_path / "a", **sections)
    results = run_plan(plan)
    (key,) = students(plan)
    run = plan.stages[key].run_dir(plan.root)
    assert sorted(p.name for p in (run.path / "tutor_cache").iterdir()) == ["epoch-001"]  # only the current one kept
    assert (run.path / "tutor" / "model.safetensors").is_file()
    # interrupted mid-epoch 2 and resumed: identical to the uninterrupted run
    plan_b = make_plan(tiny_model, tmp_path / "b", **sections)
    assert strip_times(interrupt_and_resume(plan_b, key, 9)) == strip_times(results[key])
