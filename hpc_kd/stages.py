"""Stages: the jobs a sweep is made of. Each is a frozen dataclass of exactly the settings that
change its result; its signature is their hash, and it names its inputs by signature
(:class:`ModelRef`), so a stage shared by many cells is one folder and runs once.

A stage is a picklable callable (``stage(root, run_cfg)``), the shape submitit submits.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import DataConfig, RunConfig, TrainConfig, to_dict
from .rundir import RunDir, signature


@dataclass(frozen=True)
class ModelRef:
    """A model produced by another stage: ``runs/<stage key>/<part>`` (part: model or tutor)."""

    stage: str
    part: str = "model"

    def path(self, root: Path) -> Path:
        return Path(root) / "runs" / self.stage / self.part


# Fields that only label a stage for people; they never enter the signature.
DISPLAY_FIELDS = ("role", "iteration")


class Stage:
    kind = "stage"

    def settings(self) -> dict:
        return {k: v for k, v in to_dict(self).items() if k not in DISPLAY_FIELDS}

    @property
    def signature(self) -> str:
        return signature({"kind": self.kind, **self.settings()})

    @property
    def key(self) -> str:
        return f"{self.kind}-{self.signature}"

    def inputs(self) -> list[ModelRef]:
        return []

    def run_dir(self, root: Path) -> RunDir:
        return RunDir(Path(root) / "runs" / self.key)

    def __call__(self, root: str | Path, run_cfg: RunConfig = RunConfig(), on_step=None) -> dict:
        run = self.run_dir(root)
        if run.done():
            return run.result()
        for ref in self.inputs():
            if not (ref.path(root) / "config.json").is_file():
                raise FileNotFoundError(f"{self.key} needs {ref.stage}/{ref.part}, which has not been produced")
        if run_cfg.threads:
            torch.set_num_threads(run_cfg.threads)
        run.start({"kind": self.kind, "key": self.key, "signature": self.signature, "role": self.role,
                   "settings": self.settings(), "inputs": [dataclasses.asdict(r) for r in self.inputs()]})
        result = self.execute(Path(root), run, run_cfg, on_step)
        result.update({"key": self.key, "role": self.role})
        result.setdefault("layers", self.depth)
        run.finish(result)
        return result

    def execute(self, root: Path, run: RunDir, run_cfg: RunConfig, on_step) -> dict:
        raise NotImplementedError


def _device(run_cfg: RunConfig) -> str:
    if run_cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return run_cfg.device


def _trainer_options(run_cfg: RunConfig, on_step) -> dict:
    return {"checkpoint_every": run_cfg.checkpoint_every, "log_every": run_cfg.log_every,
            "progress": run_cfg.progress and not os.environ.get("HPC_KD_NO_PROGRESS"),
            "device": _device(run_cfg), "on_step": on_step}


@dataclass(frozen=True)
class FineTune(Stage):
    """Fine-tune a pretrained encoder with cross-entropy (the teacher)."""

    data: DataConfig
    pretrained: str
    layers: int | None
    init: str
    seed: int
    train: TrainConfig
    role: str = "teacher"
    kind = "finetune"

    @property
    def depth(self):
        return self.layers

    def execute(self, root, run, run_cfg, on_step):
        from .data import Dataset
        from .loop import Task, Trainer
        from .models import depth, load_pretrained, load_tokenizer, param_count, shrink

        tokenizer = load_tokenizer(self.pretrained)
        dataset = Dataset.build(self.data, tokenizer)
        model = load_pretrained(self.pretrained, self.data.num_labels, self.seed)
        if self.layers is not None and self.layers != depth(model):
            model = shrink(model, self.layers, self.init, self.seed)
        trainer = Trainer(run, model, tokenizer, dataset, Task(), self.train, self.seed,
                          **_trainer_options(run_cfg, on_step))
        result = trainer.fit()
        result.update({"params": param_count(model), "data_fingerprints": dataset.fingerprints})
        result["layers"] = depth(model)
        return result


@dataclass(frozen=True)
class Distill(Stage):
    """Distil a ``layers``-deep model, initialised from layers of ``init_from``, from ``teacher``
    (classic KD, Algorithm 1) or from ``teacher`` and ``tutor`` under ``policy`` (TEID,
    Algorithm 2). A TEID run with an online tutor also saves the updated tutor (``tutor/``)."""

    data: DataConfig
    teacher: ModelRef
    tutor: ModelRef | None
    init_from: ModelRef
    layers: int
    init: str
    seed: int
    train: TrainConfig
    policy: str
    tau: float
    alpha: float
    loss: str
    tutor_update: str | None = None
    tutor_train: TrainConfig | None = None
    role: str = "student"
    iteration: int = 0
    kind = "distill"

    @property
    def depth(self):
        return self.layers

    def inputs(self):
        return [r for r in (self.teacher, self.tutor, self.init_from) if r is not None]

    def execute(self, root, run, run_cfg, on_step):
        from .data import Dataset
        from .loop import FrozenModel, OnlineTutor, Task, Trainer
        from .models import load_classifier, load_tokenizer, param_count, shrink
        from .policies import make_policy

        device = _device(run_cfg)
        tokenizer = load_tokenizer(str(self.teacher.path(root)))
        dataset = Dataset.build(self.data, tokenizer)
        student = shrink(load_classifier(self.init_from.path(root)), self.layers, self.init, self.seed)
        teacher = FrozenModel(load_classifier(self.teacher.path(root)).to(device))
        tutor = None
        if self.tutor is not None:
            tutor_model = load_classifier(self.tutor.path(root)).to(device)
            tutor = OnlineTutor(tutor_model, self.tutor_train) if self.tutor_update == "online" else FrozenModel(tutor_model)
        task = Task(teacher, tutor, make_policy(self.policy), self.tau, self.alpha, self.loss)
        trainer = Trainer(run, student, tokenizer, dataset, task, self.train, self.seed,
                          **_trainer_options(run_cfg, on_step))
        result = trainer.fit()
        result.update({"params": param_count(student), "policy": self.policy, "seed": self.seed,
                       "tutor_update": self.tutor_update, "iteration": self.iteration,
                       "data_fingerprints": dataset.fingerprints})
        return result
