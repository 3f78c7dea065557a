import numpy as np
import pandas as pd
import pytest

from hpc_kd.config import ConfigError, DataConfig
from hpc_kd.data import Dataset, _load_embedded, eval_batches, load_splits, train_batches
from hpc_kd.models import load_tokenizer


def test_embedded_split_is_deterministic_disjoint_and_complete():
    splits = _load_embedded(DataConfig())
    sizes = {k: len(v) for k, v in splits.items()}
    assert sum(sizes.values()) == 8530
    assert sizes == {"train": 6848, "validation": 852, "test": 830}
    ids = [set(s.ids.tolist()) for s in splits.values()]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    again = _load_embedded(DataConfig())
    for name in splits:
        assert splits[name].fingerprint() == again[name].fingerprint()
    assert set(np.unique(splits["train"].labels)) == {0, 1}
    # ids are rows of the package's CSV: the first Rotten Tomatoes sentence is row 25000
    assert splits["train"].ids.min() >= 25000


def test_cap_is_a_stable_subset():
    full = load_splits(DataConfig())["train"]
    capped = load_splits(DataConfig(max_train_examples=50))["train"]
    assert len(capped) == 50 and set(capped.ids) <= set(full.ids)
    assert capped.fingerprint() == load_splits(DataConfig(max_train_examples=50))["train"].fingerprint()


@pytest.mark.parametrize("ext", ["csv", "jsonl", "parquet"])
def test_local_files_with_custom_columns(tmp_path, ext):
    frame = pd.DataFrame({"sentence": ["good film", "bad film", "fine"], "y": [1, 0, 1]})
    files = {}
    for split in ("train", "validation"):
        path = tmp_path / f"{split}.{ext}"
        {"csv": lambda p: frame.to_csv(p, index=False),
         "jsonl": lambda p: frame.to_json(p, orient="records", lines=True),
         "parquet": lambda p: frame.to_parquet(p)}[ext](path)
        files[f"{split}_file"] = str(path)
    cfg = DataConfig(source="local", name="mine", text_column="sentence", label_column="y", **files)
    splits = load_splits(cfg)
    assert splits["train"].texts == ["good film", "bad film", "fine"]
    assert splits["train"].labels.tolist() == [1, 0, 1] and splits["train"].ids.tolist() == [0, 1, 2]
    assert "test" not in splits


def test_local_file_wrong_column_is_a_config_error(tmp_path):
    path = tmp_path / "t.csv"
    pd.DataFrame({"text": ["a"], "label": [0]}).to_csv(path, index=False)
    with pytest.raises(ConfigError) as info:
        load_splits(DataConfig(source="local", train_file=str(path), validation_file=str(path), text_column="sentence"))
    assert info.value.key == "data.text_column"


def test_hf_loader_on_a_local_dataset_folder(tmp_path):
    """The same datasets.load_dataset code that reads glue/sst2 on a cluster, on local files."""
    folder = tmp_path / "sst2like"
    (folder / "data").mkdir(parents=True)
    pd.DataFrame({"sentence": ["a b", "c d"], "label": [0, 1], "idx": [10, 11]}).to_parquet(folder / "data" / "train-0.parquet")
    pd.DataFrame({"sentence": ["e"], "label": [1], "idx": [0]}).to_parquet(folder / "data" / "validation-0.parquet")
    cfg = DataConfig(source="hf", name=str(folder), text_column="sentence")
    splits = load_splits(cfg)
    assert splits["train"].ids.tolist() == [10, 11] and splits["validation"].texts == ["e"]


def test_batches_are_length_grouped_deterministic_and_cover_everything():
    lengths = np.random.default_rng(1).integers(3, 60, size=1000)
    batches = train_batches(lengths, 16, seed=3, epoch=0)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(1000))
    assert all(len(b) <= 16 for b in batches)
    again = train_batches(lengths, 16, seed=3, epoch=0)
    assert all((a == b).all() for a, b in zip(batches, again))
    other_epoch = train_batches(lengths, 16, seed=3, epoch=1)
    assert not all(len(a) == len(b) and (a == b).all() for a, b in zip(batches, other_epoch))
    # grouping by length: much less padding than random batches
    padded = sum(len(b) * lengths[b].max() for b in batches)
    random_padded = sum(16 * lengths[np.arange(i, min(i + 16, 1000))].max() for i in range(0, 1000, 16))
    assert padded < 0.8 * random_padded
    ev = eval_batches(lengths, 100)
    assert sorted(np.concatenate(ev).tolist()) == list(range(1000))


def test_tokenise_and_pad_dynamically(tiny_model):
    tok = load_tokenizer(str(tiny_model))
    ds = Dataset.build(DataConfig(max_train_examples=20, max_eval_examples=10, max_length=12), tok)
    enc = ds.encoded["train"]
    assert max(enc.lengths) <= 12
    batch = enc.collate(np.array([0, 1, 2]))
    width = max(enc.lengths[:3])
    assert batch["input_ids"].shape == (3, width)
    assert batch["attention_mask"].sum(1).tolist() == enc.lengths[:3].tolist()
    assert batch["example_ids"].tolist() == enc.ids[:3].tolist()


# -- bad data: one clear error naming the file, the row and the column, before anything runs ----

def write_csv(path, text: str | bytes):
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


def local(tmp_path, train: str | bytes, **kw) -> DataConfig:
    names = kw.get("label_names") or ("0", "1")
    good = write_csv(tmp_path / "validation.csv", f"text,label\ngood,{names[1]}\nbad,{names[0]}\n")
    return DataConfig(source="local", train_file=write_csv(tmp_path / "train.csv", train), validation_file=good, **kw)


@pytest.mark.parametrize("content,kw,needle", [
    ("text,label\ngood,pos\nbad,neg\n", {}, "train.csv, row 1 (line 2): string label 'pos'; list the classes in order in data.label_names"),
    ("text,label\ngood,pos\nbad,meh\n", {"label_names": ("neg", "pos")}, "train.csv, row 2 (line 3): unknown label 'meh'; allowed (data.label_names): neg, pos"),
    ("text,label\ngood,1.5\nbad,0\n", {}, "train.csv, row 1 (line 2): label 1.5 is not an integer class"),
    ("text,label\ngood,1\nbad,\n", {}, "train.csv, row 2 (line 3): the label is missing"),
    ("text,label\ngood,1\nbad,2\n", {}, "train.csv, row 2 (line 3): label 2 outside [0, 2)"),
    ("text,label\ngood,1\n,0\n", {}, "train.csv, row 2 (line 3): the text is empty"),
    ("", {}, "train.csv is empty (not even a header row)"),
    ("text,label\n", {}, "train.csv has no rows"),
    (b"text,label\ngood,1\nb\xe9d,0\n", {}, "train.csv, line 3: not valid UTF-8 (byte 0xe9"),
    ("text,label\ngood,1\nbad,1\n", {}, "every one of its 2 rows has label 1: a classifier cannot learn from one class"),
    ("id,text,label\n1,good,1\nseven,bad,0\n", {}, "train.csv, row 2 (line 3): example id 'seven' is not an integer"),
    ("idx,text,label\n1,good,1\n2.5,bad,0\n", {}, "train.csv, row 2 (line 3): example id '2.5' is not an integer"),
    ("id,text,label\n1,good,1\n1,bad,0\n", {}, "example ids in"),
])
def test_bad_local_data_is_refused_with_file_row_and_column(tmp_path, content, kw, needle):
    from hpc_kd.data import check_data

    with pytest.raises(ConfigError) as info:
        check_data(local(tmp_path, content, **kw))
    assert needle in str(info.value), str(info.value)
    assert str(tmp_path / "train.csv") in str(info.value)
    assert "\n" not in str(info.value)


def test_string_labels_map_through_label_names_and_enter_the_fingerprint(tmp_path):
    cfg = local(tmp_path, "text,label\ngood,pos\nbad,neg\nfine, pos \n", label_names=("neg", "pos"))
    train = load_splits(cfg)["train"]
    assert train.labels.tolist() == [1, 0, 1]
    flipped = load_splits(local(tmp_path, "text,label\ngood,pos\nbad,neg\nfine, pos \n", label_names=("pos", "neg")))
    assert flipped["train"].labels.tolist() == [0, 1, 0]
    assert flipped["train"].fingerprint() != train.fingerprint()
    with pytest.raises(ConfigError, match="label_names: 3 names for num_labels 2"):
        DataConfig(label_names=("a", "b", "c"))
