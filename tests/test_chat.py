"""Chat and instruction data (issue 18, items 3-5): conversations rendered with the tokenizer's
chat template, only the assistant's tokens learnt, cached and scored; truncation that never drops a
response silently; bad rows refused before anything runs; lm-eval-style choice accuracy."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from hpc_kd import launch
from hpc_kd.config import ConfigError, DataConfig
from hpc_kd.data import Dataset, encode_chat, render
from hpc_kd.models import load_tokenizer
from hpc_kd.plan import experiment

from .conftest import interrupt_and_resume, make_plan, run_plan, strip_times, write_yaml
from .test_lm_models import QUICK, WIDE

#: the tiny tokenizer has no chat words: roles become words of its vocabulary
TEMPLATE = ("{% for m in messages %}[CLS] {{ {'system': 'we', 'user': 'they', 'assistant': 'me'}[m['role']] }} : "
            "{{ m['content'] }} [SEP] {% endfor %}{% if add_generation_prompt %}[CLS] me : {% endif %}")


@pytest.fixture(scope="module")
def chat_decoder(tiny_decoder, tmp_path_factory):
    """The tiny decoder with :data:`TEMPLATE` as its tokenizer's own chat template."""
    folder = tmp_path_factory.mktemp("chat") / "llama"
    shutil.copytree(tiny_decoder, folder)
    tok = load_tokenizer(str(folder), lm=True)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(folder)
    assert load_tokenizer(str(folder), lm=True).chat_template == TEMPLATE
    return folder


def conversations(n: int, seed: int = 0) -> list[dict]:
    """``n`` rows of sentiment chat on the embedded sentences: "what about this film ? <review>"
    answered "great" or "awful"; every third has a system turn, every fourth a second turn ("so ?"
    answered again), and a ``label`` column (the answer)."""
    from hpc_kd.data import load_splits

    split = load_splits(DataConfig())["train"]
    rng = np.random.default_rng(seed)
    rows = []
    for i in rng.choice(len(split), n, replace=False):
        answer = ["awful", "great"][int(split.labels[i])]
        messages = [{"role": "user", "content": f"what about this film ? {split.texts[i]}"},
                    {"role": "assistant", "content": answer}]
        if len(rows) % 3 == 0:
            messages.insert(0, {"role": "system", "content": "think about the story"})
        if len(rows) % 4 == 0:
            messages += [{"role": "user", "content": "so ?"}, {"role": "assistant", "content": answer}]
        rows.append({"messages": messages, "label": answer})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def chat_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat_data")
    return {"train": write_jsonl(folder / "train.jsonl", conversations(48)),
            "validation": write_jsonl(folder / "validation.jsonl", conversations(16, seed=1))}


def chat_data(files, **extra) -> dict:
    return {"task": "causal_lm", "source": "local", "format": "chat", "train_file": files["train"],
            "validation_file": files["validation"], "max_length": 48, **extra}


def checked(data: dict, teacher) -> None:
    """The plan-time checks of an experiment on ``data`` with the teacher ``teacher``."""
    experiment({"data": data, "teacher": {"pretrained": str(teacher)}, "tutor": {"layers": 3}, "student": {"layers": [2]}})


def test_the_mask_of_a_two_turn_conversation(chat_decoder):
    """Golden: every assistant turn is learnt, its end-of-turn token included; nothing else is."""
    tok = load_tokenizer(str(chat_decoder), lm=True)
    messages = [{"role": "system", "content": "think"}, {"role": "user", "content": "a funny film ?"},
                {"role": "assistant", "content": "yes"}, {"role": "user", "content": "so ?"},
                {"role": "assistant", "content": "great story"}]
    text, spans = render(tok, messages, TEMPLATE)
    assert text == ("[CLS] we : think [SEP] [CLS] they : a funny film ? [SEP] [CLS] me : yes [SEP] "
                    "[CLS] they : so ? [SEP] [CLS] me : great story [SEP] ")
    assert [text[a:b] for a, b in spans] == ["yes [SEP]", "great story [SEP]"]
    (tokens,), (learnt,) = encode_chat([messages], tok, TEMPLATE, max_length=64)
    words = tok.convert_ids_to_tokens(tokens.tolist())
    assert words == ["[CLS]", "we", ":", "think", "[SEP]", "[CLS]", "they", ":", "a", "funny", "film", "?", "[SEP]",
                     "[CLS]", "me", ":", "yes", "[SEP]", "[CLS]", "they", ":", "so", "?", "[SEP]",
                     "[CLS]", "me", ":", "great", "story", "[SEP]"]
    assert [w for w, keep in zip(words, learnt) if keep] == ["yes", "[SEP]", "great", "story", "[SEP]"]
    assert np.flatnonzero(learnt).tolist() == [16, 17, 27, 28, 29]
    # the last turn only (choice scoring)
    (_,), (last,) = encode_chat([messages], tok, TEMPLATE, max_length=64, last_only=True)
    assert np.flatnonzero(last).tolist() == [27, 28, 29]
    # in a batch: labels -100 everywhere but on the learnt tokens; positions predict them
    from hpc_kd.data import Encoded

    enc = Encoded(np.array([7]), [tokens], np.zeros(1, dtype=np.int64), 0, lm=True, targets=[learnt])
    labels = enc.collate(np.array([0]))["labels"][0]
    assert np.flatnonzero(labels.numpy() != -100).tolist() == [16, 17, 27, 28, 29]
    assert enc.positions(0).tolist() == [15, 16, 26, 27, 28]


def test_truncation_cuts_the_prompt_from_the_left_and_never_the_response(chat_decoder):
    tok = load_tokenizer(str(chat_decoder), lm=True)
    short = [{"role": "user", "content": "a funny film ?"}, {"role": "assistant", "content": "yes"}]
    (full,), (learnt,) = encode_chat([short], tok, TEMPLATE, max_length=64)
    assert len(full) == 13 and np.flatnonzero(learnt).tolist() == [11, 12]
    (cut,), (cut_learnt,) = encode_chat([short], tok, TEMPLATE, max_length=5)
    assert cut.tolist() == full[-5:].tolist() and np.flatnonzero(cut_learnt).tolist() == [3, 4]
    (none,), (_,) = encode_chat([short], tok, TEMPLATE, max_length=2)  # a token before the response is kept too
    assert none is None
    (tight,), _ = encode_chat([short], tok, TEMPLATE, max_length=3)
    assert tok.convert_ids_to_tokens(tight.tolist()) == [":", "yes", "[SEP]"]


def test_overlong_rows_are_dropped_and_counted_or_refused(chat_decoder, tmp_path, capsys):
    rows = conversations(6)
    rows[2]["messages"][-1]["content"] = " ".join(["great"] * 40)  # a response longer than max_length
    files = {"train": write_jsonl(tmp_path / "train.jsonl", rows), "validation": write_jsonl(tmp_path / "v.jsonl", rows[:3])}
    tok = load_tokenizer(str(chat_decoder), lm=True)
    data = Dataset.build(DataConfig(**chat_data(files, max_length=24)), tok)
    assert data.encoded["train"].dropped == 1 and len(data.encoded["train"]) == 5
    assert 2 not in data.encoded["train"].ids.tolist()
    assert "train: 1 of 6 conversations do not fit in max_length 24" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"train.jsonl.*example 2: its response does not fit in 24 tokens") as err:
        checked(chat_data(files, max_length=24, overlong="refuse"), chat_decoder)
    assert err.value.key == "data.max_length"


BAD_ROWS = [
    ("not a list", "a string that is no JSON", r"row 2: not a JSON list of \{role, content\} messages"),
    ("not pairs", [{"role": "user", "text": "hi"}], r"row 2: message 1 is not a \{role, content\} pair"),
    ("unknown role", [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yes"}],
     r"row 2: message 2 has role 'bot'; allowed: system, user, assistant"),
    ("no assistant", [{"role": "user", "content": "hi"}], r"row 2: no assistant turn"),
    ("empty response", [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}],
     r"row 2: message 2, the assistant's, is empty"),
    ("no prompt", [{"role": "system", "content": "hi"}, {"role": "assistant", "content": "yes"}],
     r"row 2: the first assistant turn \(message 2\) has no user turn before it"),
]


@pytest.mark.parametrize("name,messages,error", BAD_ROWS, ids=[b[0] for b in BAD_ROWS])
def test_a_bad_chat_row_is_refused_naming_file_and_row(chat_decoder, tmp_path, name, messages, error):
    rows = conversations(3)
    rows[1]["messages"] = messages
    files = {"train": write_jsonl(tmp_path / "train.jsonl", rows), "validation": write_jsonl(tmp_path / "v.jsonl", rows[:1])}
    with pytest.raises(ConfigError, match=error) as err:
        checked(chat_data(files), chat_decoder)
    assert err.value.key == "data.messages_column ('messages')" and "train.jsonl" in str(err.value)


def test_bad_prompt_response_rows_and_a_missing_template_stop_the_launcher(chat_decoder, tiny_decoder, tmp_path, capsys):
    frame = pd.DataFrame({"prompt": ["a funny film ?", "so ?", "dull ?"], "response": ["yes", "", "no"]})
    frame.to_csv(tmp_path / "train.csv", index=False)
    frame.iloc[[0]].to_csv(tmp_path / "v.csv", index=False)
    cfg = {"name": "pr", "output_root": str(tmp_path / "out"), "teacher": {"pretrained": str(chat_decoder)},
           "tutor": {"layers": 3}, "student": {"layers": [2]},
           "data": {"task": "causal_lm", "source": "local", "format": "prompt_response",
                    "train_file": str(tmp_path / "train.csv"), "validation_file": str(tmp_path / "v.csv")}}
    assert launch.main([str(write_yaml(tmp_path / "s.yaml", cfg))]) == 2
    err = capsys.readouterr().err
    assert "data.response_column ('response')" in err and "train.csv, row 2 (line 3): the response is empty" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
    frame.assign(response=["yes", "great", "no"]).to_csv(tmp_path / "train.csv", index=False)
    cfg["teacher"]["pretrained"] = str(tiny_decoder)  # no chat template
    assert launch.main([str(write_yaml(tmp_path / "s.yaml", cfg))]) == 2
    err = capsys.readouterr().err
    assert "data.chat_template" in err and "has no chat template" in err and "Traceback" not in err
    cfg["data"]["chat_template"] = TEMPLATE  # ... unless the config gives one
    experiment({k: v for k, v in cfg.items() if k not in ("name", "output_root")})


def test_choices_are_scored_by_their_log_likelihood(chat_decoder, chat_files):
    """Each answer's score is its summed log-probability after the prompt, computed here by hand
    from the model's logits of that conversation alone (to float tolerance: batched and padded
    passes round differently); choice_accuracy is the argmax against the gold column."""
    from transformers import AutoModelForCausalLM

    from hpc_kd.loop import choice_scores, evaluate

    tok = load_tokenizer(str(chat_decoder), lm=True)
    cfg = DataConfig(**chat_data(chat_files, choices=("awful", "great")))
    data = Dataset.build(cfg, tok).encoded["validation"]
    rows = [json.loads(x) for x in open(chat_files["validation"])]
    assert data.choices.answers == 2 and len(data.choices) == 2 * len(data)
    assert data.choices.labels[::2].tolist() == [["awful", "great"].index(r["label"]) for r in rows]
    model = AutoModelForCausalLM.from_pretrained(chat_decoder).eval()
    manual = []
    for row in rows:
        scores = []
        for answer in ("awful", "great"):
            messages = [*row["messages"][:-1], {"role": "assistant", "content": answer}]
            (ids,), (learnt,) = encode_chat([messages], tok, TEMPLATE, 48, last_only=True)
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.from_numpy(ids)[None]).logits[0].double(), -1)
            scores.append(sum(float(logp[t - 1, ids[t]]) for t in np.flatnonzero(learnt)))
        manual.append(scores)
    scores = choice_scores(model, data.choices, 4, "cpu")
    assert scores.shape == (len(rows), 2)
    assert scores == pytest.approx(np.array(manual), abs=1e-4)
    gold = data.choices.labels[::2]
    metrics = evaluate(model, data, 8, 0, "cpu", per_example=True)
    assert metrics["choice_accuracy"] == float(np.mean(choice_scores(model, data.choices, 8, "cpu").argmax(1) == gold))
    assert len(metrics["choice_correct"]) == len(rows)


def _chat_chain(decoder, files, student, **data) -> dict:
    return {"data": chat_data(files, **data),
            "teacher": {"pretrained": str(decoder), "train": {"lr": 3e-3, "batch_size": 16, "epochs": 2}},
            "tutor": {"layers": 3, "train": QUICK},
            "student": {"layers": [2], "train": {**QUICK, "epochs": 2, "patience": 2}, **student},
            "distill": {"policy": "min_loss", "targets": "cache", "sparse_k": 8}}


def test_the_cache_holds_exactly_the_response_positions(chat_decoder, chat_files, tmp_path):
    import pyarrow.parquet as pq

    plan = make_plan(chat_decoder, tmp_path, **_chat_chain(chat_decoder, chat_files, {}))
    teacher, cache = list(plan.stages.values())[:2]
    results = run_plan(plan, only=[teacher.key, cache.key])
    data = Dataset.build(cache.data, load_tokenizer(str(chat_decoder), lm=True)).encoded["train"]
    learnt = sum(int(t[1:].sum()) for t in data.targets)
    import pyarrow as pa

    table = pa.concat_tables([pq.read_table(f) for f in sorted(cache.folder(plan.root).glob("*.parquet"))])
    assert table.num_rows == results[cache.key]["rows"] == learnt < sum(len(t) - 1 for t in data.tokens) / 5
    counts = dict(zip(*np.unique(table.column("example_id").to_numpy(), return_counts=True)))
    assert counts == {int(i): len(data.positions(j)) for j, i in enumerate(data.ids)}
    assert results[cache.key]["bytes_per_token"] == pytest.approx(results[cache.key]["bytes"] / learnt, abs=0.01)
    # the stored targets are the teacher's top 8 at those positions
    from transformers import AutoModelForCausalLM

    from hpc_kd.cache import SparseLogitCache

    model = AutoModelForCausalLM.from_pretrained(teacher.run_dir(plan.root).model).eval()
    sparse = cache.load(plan.root, Dataset.build(cache.data, load_tokenizer(str(chat_decoder), lm=True)), plan.run)
    assert isinstance(sparse, SparseLogitCache)
    batch = data.collate(np.array([0]))
    t = sparse.targets(batch["example_ids"], batch["input_ids"].shape[1])
    with torch.no_grad():
        z = model(input_ids=batch["input_ids"]).logits[0, :-1]
    for p in data.positions(0):  # a top 8 of the teacher's logits (up to rounding at a tie for 8th place)
        ids = t.ids[0, p]
        assert len(set(ids.tolist())) == 8 and z[p, ids].min() >= z[p].topk(8).values[-1] - 1e-4
    unlearnt = np.setdiff1d(np.arange(len(data.tokens[0]) - 1), data.positions(0))
    assert torch.isinf(t.log_probs[0, unlearnt]).all()


@pytest.mark.parametrize("student", [{"config": WIDE}, {"layers": [1]}, "pretrained"],
                         ids=["wider", "shallower", "pretrained"])
def test_a_chat_chain_distils_any_student_and_resumes(chat_decoder, chat_files, tmp_path, tmp_path_factory, student):
    """teacher -> cache -> tutor -> student on chat jsonl, with choices: resumed to identical results."""
    if student == "pretrained":
        from .conftest import build_tiny_decoder

        small = build_tiny_decoder(tmp_path_factory.mktemp("small") / "llama", layers=2)
        tok = load_tokenizer(str(small), lm=True)
        tok.chat_template = TEMPLATE
        tok.save_pretrained(small)
        student = {"pretrained": str(small)}
    sections = _chat_chain(chat_decoder, chat_files, student, choices=["awful", "great"])
    reference = run_plan(make_plan(chat_decoder, tmp_path / "ref", **sections))
    plan = make_plan(chat_decoder, tmp_path / "resumed", **sections)
    key = list(plan.stages)[-1]
    assert [s.kind for s in plan.stages.values()] == ["finetune", "cache", "distill", "distill"]
    resumed = interrupt_and_resume(plan, key, 2)
    assert strip_times(resumed) == strip_times(reference[key])
    for result in (resumed, reference[list(plan.stages)[0]]):
        assert 0 <= result["validation"]["choice_accuracy"] <= 1 and np.isfinite(result["validation"]["token_nll"])
    from hpc_kd.aggregate import COLUMNS, _fill

    row = {c: None for c in COLUMNS}
    _fill(row, resumed)
    assert row["val_choice_acc"] == resumed["validation"]["choice_accuracy"]


def test_chat_rows_read_alike_from_jsonl_parquet_csv_and_a_hub_dataset_folder(tmp_path):
    """The same conversations from each kind of source: jsonl (lists of dicts), parquet (arrays of
    structs), csv (the list as JSON text) and ``datasets.load_dataset`` on a dataset folder (the
    code that reads a hub dataset on a cluster)."""
    from hpc_kd.data import load_splits

    rows = conversations(5)
    frame = pd.DataFrame({"messages": [r["messages"] for r in rows], "label": [r["label"] for r in rows]})
    write_jsonl(tmp_path / "c.jsonl", rows)
    frame.to_parquet(tmp_path / "c.parquet")
    frame.assign(messages=[json.dumps(m) for m in frame["messages"]]).to_csv(tmp_path / "c.csv", index=False)
    hub = tmp_path / "hub" / "data"
    hub.mkdir(parents=True)
    frame.to_parquet(hub / "train-0.parquet")
    frame.to_parquet(hub / "validation-0.parquet")
    texts = []
    for source, files in (("local", "c.jsonl"), ("local", "c.parquet"), ("local", "c.csv"), ("hf", None)):
        cfg = dict(task="causal_lm", format="chat", choices=("awful", "great"))
        if source == "local":
            cfg.update(source="local", train_file=str(tmp_path / files), validation_file=str(tmp_path / files))
        else:
            cfg.update(source="hf", name=str(tmp_path / "hub"))
        split = load_splits(DataConfig(**cfg))["train"]
        texts.append((split.texts, split.labels.tolist()))
    assert all(t == texts[0] for t in texts[1:])
    assert [json.loads(t) for t in texts[0][0]] == [r["messages"] for r in rows]
    assert texts[0][1] == [["awful", "great"].index(r["label"]) for r in rows]


def test_the_embedded_corpus_as_chat():
    """Two assistant turns per review: the review itself, then its label as "negative" /
    "positive" (the turn data.choices replaces); the same split and ids as the text corpus."""
    from hpc_kd.data import load_splits

    text = load_splits(DataConfig(task="causal_lm", name="rotten_tomatoes"))["validation"]
    chat = load_splits(DataConfig(task="causal_lm", name="rotten_tomatoes", format="chat",
                                  choices=("negative", "positive")))["validation"]
    labelled = load_splits(DataConfig())["validation"]
    assert chat.ids.tolist() == text.ids.tolist() == labelled.ids.tolist()
    first = json.loads(chat.texts[0])
    assert [m["role"] for m in first] == ["system", "user", "assistant", "user", "assistant"]
    assert first[2]["content"] == text.texts[0]
    assert [json.loads(t)[-1]["content"] for t in chat.texts[:50]] == [["negative", "positive"][y] for y in labelled.labels[:50]]
    assert chat.labels.tolist() == labelled.labels.tolist()
    with pytest.raises(ConfigError, match="the embedded chat corpus answers"):
        DataConfig(task="causal_lm", format="chat", choices=("bad", "good"))
