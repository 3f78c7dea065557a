"""Stages: the jobs a sweep is made of. Each is a frozen dataclass of exactly the settings that
change its result; its signature is their hash, and it names its inputs by signature
(:class:`ModelRef`), so a stage shared by many cells is one folder and runs once.

A stage is a picklable callable (``stage(root, run_cfg)``), the shape submitit submits.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import DataConfig, RunConfig, TrainConfig, to_dict
from .rundir import RunDir, SweepDir, signature


@dataclass(frozen=True)
class ModelRef:
    """A model produced by another stage: ``runs/<stage key>/<part>`` (part: model or tutor)."""

    stage: str
    part: str = "model"

    def path(self, root: Path) -> Path:
        return SweepDir(root).run(self.stage).path / self.part


# Fields that only label a stage for people; they never enter the signature.
DISPLAY_FIELDS = ("role", "iteration")


def _without_execution(settings: dict) -> dict:
    """A train section's ``deepspeed`` is how the stage runs, not what it computes: it is left
    out of the signature, except a precision other than fp32 (which changes the numbers). Its
    keys added later are left out at their default (:data:`LATER_TRAIN_KEYS`)."""
    for key in ("train", "tutor_train"):
        if not isinstance(settings.get(key), dict):
            continue
        settings[key] = train = _later_dropped(settings[key], LATER_TRAIN_KEYS)
        if "deepspeed" in train:
            ds = train.pop("deepspeed")
            if ds and ds["precision"] != "fp32":
                train["precision"] = ds["precision"]
    return settings


#: train keys added after schema 2, left out of a signature at their default
LATER_TRAIN_KEYS = {"freeze_embeddings": False}
#: stage fields added after schema 2, left out of a signature at their default (as below)
LATER_FIELDS = {"loss_args": None, "sparse": None, "support": None, "arch": None}
#: data keys added after schema 2, left out of a signature at their default, so that runs from
#: before them are still found (an explicit metric equal to the task's default is the default).
LATER_DATA_KEYS = {"task": "classification", "text_pair_column": None, "also_evaluate": [], "metric": None,
                   "format": "text", "messages_column": "messages", "prompt_column": "prompt",
                   "response_column": "response", "chat_template": None, "overlong": "drop", "choices": None}


def _later_dropped(settings: dict, later: dict) -> dict:
    return {k: v for k, v in settings.items() if not (k in later and v == later[k])}


def _data_settings(data: dict, cfg: DataConfig) -> dict:
    if data.get("metric") == cfg.headline_metric:  # the task's default, said explicitly
        data = {**data, "metric": None}
    return _later_dropped(data, LATER_DATA_KEYS)


class Stage:
    kind = "stage"

    def settings(self) -> dict:
        settings = _later_dropped({k: v for k, v in to_dict(self).items() if k not in DISPLAY_FIELDS}, LATER_FIELDS)
        for key, value in vars(self).items():
            if isinstance(value, DataConfig):
                settings[key] = _data_settings(settings[key], value)
            elif isinstance(value, Stage) and isinstance(getattr(value, "data", None), DataConfig):
                nested = _later_dropped(settings[key], LATER_FIELDS)
                settings[key] = {**nested, "data": _data_settings(nested["data"], value.data)}
        return _without_execution(settings)

    @property
    def signature(self) -> str:
        return signature({"kind": self.kind, **self.settings()})

    @property
    def key(self) -> str:
        return f"{self.kind}-{self.signature}"

    def inputs(self) -> list[ModelRef]:
        return []

    def run_dir(self, root: Path) -> RunDir:
        return SweepDir(root).run(self.key)

    def __call__(self, root: str | Path, run_cfg: RunConfig = RunConfig(), on_step=None) -> dict:
        from . import distributed, trackers

        if not distributed.active() and distributed.detect().size > 1:
            # one task of a job with several (SLURM, submitit, torchrun): join the others first
            return distributed.run_stage(self, root, run_cfg, on_step)
        # On several ranks every rank calls this; only rank 0 writes the folder, and rank 0's
        # view of "done" is everyone's.
        run = distributed.for_this_rank(self.run_dir(root))
        if distributed.broadcast(run.done()):
            return run.result()
        for ref in self.inputs():
            if not SweepDir(root).run(ref.stage).done():
                raise FileNotFoundError(f"{self.key} needs {ref.stage}/{ref.part}, which has not been produced")
        with run.owned():  # one live process per run folder, taken before anything is written
            if run.done():  # finished by another process while this one looked
                return run.result()
            run.set_aside_damaged()  # a record that cannot be read: run it again
            with trackers.mirror(run, self, Path(root), run_cfg.trackers) as run:  # run.trackers see its records
                return self._run(Path(root), run, run_cfg, on_step)

    def _run(self, root: Path, run: RunDir, run_cfg: RunConfig, on_step) -> dict:
        """Run the stage into ``run``, which this process owns."""
        from . import distributed

        threads = torch.get_num_threads()  # restored after: a stage run in-process leaves no trace
        try:
            if run_cfg.threads:
                torch.set_num_threads(run_cfg.threads)
            run.start({"kind": self.kind, "key": self.key, "signature": self.signature, "role": self.role,
                       "settings": self.settings(), "inputs": [dataclasses.asdict(r) for r in self.inputs()]})
            result = self.execute(root, run, run_cfg, on_step)
        finally:
            torch.set_num_threads(threads)
        result.update({"key": self.key, "role": self.role})
        result.setdefault("layers", self.depth)
        run.finish(result)
        distributed.finish_run(run)
        return result

    def execute(self, root: Path, run: RunDir, run_cfg: RunConfig, on_step) -> dict:
        raise NotImplementedError


def _device(run_cfg: RunConfig) -> str:
    from .distributed import current, device_for

    return device_for(current(), run_cfg.device)


def _trainer(run, model, tokenizer, dataset, task, train: TrainConfig, seed: int, run_cfg: RunConfig, on_step):
    """The loop's trainer: plain PyTorch in one process, DeepSpeed with a ``deepspeed`` section
    or on several ranks."""
    from . import distributed

    options = _trainer_options(run_cfg, on_step)
    if train.deepspeed is None and distributed.current().size == 1:
        from .loop import Trainer

        return Trainer(run, model, tokenizer, dataset, task, train, seed, **options)
    from .engine import EngineTrainer

    distributed.init(distributed.World(), options["device"])  # one rank: a private group (no-op on several)
    return EngineTrainer(run, model, tokenizer, dataset, task, train, seed, **options)


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
        from .models import depth, load_pretrained, load_tokenizer, param_count, shrink

        tokenizer = load_tokenizer(self.pretrained, lm=self.data.lm)
        dataset = Dataset.build(self.data, tokenizer)
        model = load_pretrained(self.pretrained, self.data.num_labels, self.seed, lm=self.data.lm)
        if self.layers is not None and self.layers != depth(model):
            model = shrink(model, self.layers, self.init, self.seed)
        from .step import Task

        trainer = _trainer(run, model, tokenizer, dataset, Task(), self.train, self.seed, run_cfg, on_step)
        result = trainer.fit()
        result.update({"params": param_count(model), "data_fingerprints": dataset.fingerprints})
        result["layers"] = depth(model)
        if self.data.lm:  # the floor any language model must beat, shown under the teacher's row
            from .metrics import learnt_tokens, unigram_nll

            vocab = int(model.get_output_embeddings().out_features)
            seen = learnt_tokens(dataset.encoded["train"])
            result["unigram"] = {split: unigram_nll(seen, learnt_tokens(dataset.encoded[split]), vocab)
                                 for split in dataset.reported}
        return result


@dataclass(frozen=True)
class CacheLogits(Stage):
    """Run a frozen model over the training split once and store its logits as Parquet shards
    (``logits/``, see :mod:`hpc_kd.cache`), so distillation never runs that model again."""

    data: DataConfig
    model: ModelRef
    split: str = "train"
    #: a language model's sparse targets: kind, k, precision, tau (hpc_kd.cache, hpc_kd.sparse)
    sparse: dict | None = None
    #: a frozen tutor's cache: the teacher's cache whose tokens (and tail) it is written on, so that
    #: the two are compared on one support
    support: "CacheLogits | None" = None
    role: str = "cache"
    kind = "cache"
    depth = None

    def inputs(self):
        return [self.model] + ([ModelRef(self.support.key, "logits")] if self.support is not None else [])

    def folder(self, root: Path) -> Path:
        return self.run_dir(root).logits

    def expected(self, root: Path, dataset) -> dict:
        """The producer fingerprint a reader training on ``dataset`` requires."""
        from .cache import producer

        prod = producer(self.model.path(root), self.data.max_length, f"{self.data.source}:{self.data.name}",
                        self.split, dataset.fingerprints[self.split])
        if self.support is not None:
            prod["support"] = self.support.key
        return prod

    def execute(self, root, run, run_cfg, on_step):
        from .cache import write_cache
        from .data import Dataset
        from .models import depth, load_classifier, load_tokenizer

        model_dir = self.model.path(root)
        dataset = Dataset.build(self.data, load_tokenizer(str(model_dir)))
        model = load_classifier(model_dir)
        sparse = {}
        if self.sparse is not None:  # a language model's targets: one column per vocabulary entry
            sparse = {"sparse": self.sparse, "support": self.support.load(root, dataset, run_cfg) if self.support else None}
        width = model.get_output_embeddings().out_features if self.sparse is not None else self.data.num_labels
        manifest = write_cache(self.folder(root), model, dataset.encoded[self.split], self.expected(root, dataset),
                               width, rows_per_shard=run_cfg.cache_rows_per_shard, device=_device(run_cfg),
                               progress=_trainer_options(run_cfg, None)["progress"], **sparse)
        result = {"kind": "cache", "rows": manifest["total_rows"], "shards": len(manifest["shards"]),
                  "bytes": manifest["bytes"], "producer": manifest["producer"], "layers": depth(model)}
        if self.sparse is not None:  # rows are tokens: the learnt ones (chat data: the response tokens)
            result["bytes_per_token"] = round(manifest["bytes"] / max(manifest["total_rows"], 1), 2)
        return {**result, "sparse": self.sparse} if self.sparse is not None else result

    def load(self, root: Path, dataset, run_cfg: RunConfig):
        """The validated cache for ``dataset``. A cache that fails validation is rebuilt from its
        producer (which is known: ``self.model``); a second failure stops the run."""
        import shutil
        import sys

        from .cache import CacheError, LogitCache

        from . import distributed

        expected = self.expected(root, dataset)
        ids = dataset.encoded[self.split].ids
        if self.sparse is not None:
            from .cache import SparseLogitCache
            from .rundir import read_json

            vocab = read_json(self.model.path(root) / "config.json").get("vocab_size")  # what the ids index

            data = dataset.encoded[self.split]  # chat data: only the assistant's positions are cached
            positions = None if data.targets is None else {int(data.ids[i]): data.positions(i) for i in range(len(data))}

            def open_cache():
                return SparseLogitCache.open(self.folder(root), expected, ids, self.sparse, vocab, positions)
        else:
            def open_cache():
                return LogitCache.open(self.folder(root), expected, ids)
        try:
            error = None
            cache = open_cache()
        except CacheError as err:
            error = str(err)
        if distributed.broadcast(error) is None:  # rank 0's verdict is everyone's
            return cache
        distributed.barrier()  # every rank is done reading before rank 0 deletes
        run = distributed.for_this_rank(self.run_dir(root))
        log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
        # Serialised: a second reader that found the same damage waits for the first one's
        # rebuild (never deletes a half-built cache), then finds it valid.
        with run.owned(wait=True, log=log):
            if distributed.current().is_main:
                try:
                    open_cache()
                    rebuilt_meanwhile = True
                except CacheError:
                    rebuilt_meanwhile = False
            if not distributed.broadcast(rebuilt_meanwhile if distributed.current().is_main else None):
                if distributed.current().is_main:
                    log(f"[cache] {error}; rebuilding {self.key} from {self.model.stage}/{self.model.part}")
                    run.discard_result()
                    shutil.rmtree(self.folder(root), ignore_errors=True)
                distributed.barrier()
                result = self._run(root, run, run_cfg, None)
                # said in the result, so the launcher can say it on its console (executors._finish)
                run.finish({**result, "rebuilt": {"why": error, "at": time.time()}})
        return open_cache()


@dataclass(frozen=True)
class Distill(Stage):
    """Distil a ``layers``-deep model, initialised from layers of ``init_from`` (a trained model,
    or a pretrained name such as "embedded" with a fresh head), from ``teacher``
    (classic KD, Algorithm 1) or from ``teacher`` and ``tutor`` under ``policy`` (TEID,
    Algorithm 2). A TEID run with an online tutor also saves the updated tutor (``tutor/``)."""

    data: DataConfig
    teacher: ModelRef
    tutor: ModelRef | None
    init_from: ModelRef | str
    #: its depth; None: ``init_from`` is a pretrained decoder taken as it is (not pruned)
    layers: int | None
    init: str
    seed: int
    train: TrainConfig
    policy: str
    tau: float
    alpha: float
    loss: str
    tutor_update: str | None = None
    tutor_train: TrainConfig | None = None
    #: logit caches to read targets from (None: run the model live, as in the paper)
    teacher_cache: CacheLogits | None = None
    tutor_cache: CacheLogits | None = None
    policy_args: dict | None = None
    #: the distillation term's parameters (None: it has none; then left out of the signature)
    loss_args: dict | None = None
    #: a fresh model of ``init_from``'s family with these sizes (models.fresh); None: see ``layers``
    arch: dict | None = None
    role: str = "student"
    iteration: int = 0
    kind = "distill"

    @property
    def depth(self):
        if self.layers is None:  # a pretrained decoder as it is: its own depth, where it can be read offline
            from .models import pretrained_depth

            return pretrained_depth(self.init_from, lm=True)
        return self.layers

    def inputs(self):
        refs = [self.teacher, self.tutor, self.init_from if isinstance(self.init_from, ModelRef) else None]
        refs += [ModelRef(c.key, "logits") for c in (self.teacher_cache, self.tutor_cache) if c is not None]
        return [r for r in refs if r is not None]

    @property
    def mode(self):
        from .sources import TutorMode

        return TutorMode(self.tutor_update) if self.tutor is not None else TutorMode.NONE

    def execute(self, root, run, run_cfg, on_step):
        from .data import Dataset
        from .models import depth, load_classifier, load_pretrained, load_tokenizer, param_count
        from .policies import POLICIES, make_policy
        from .sources import CachedLogits, FrozenModel, OnlineTutor, RefreshTutor, TutorMode
        from .step import Task

        device = _device(run_cfg)
        tokenizer = load_tokenizer(str(self.teacher.path(root)))
        dataset = Dataset.build(self.data, tokenizer)
        student = self._build(root, tokenizer)
        if not POLICIES[self.policy].needs_teacher:  # the baseline: the gold loss alone
            teacher = None
        elif self.teacher_cache is not None:
            teacher = CachedLogits(self.teacher_cache.load(root, dataset, run_cfg), device)
        else:
            teacher = FrozenModel(load_classifier(self.teacher.path(root)).to(device))
        mode, tutor = self.mode, None
        if mode is TutorMode.FROZEN and self.tutor_cache is not None:
            tutor = CachedLogits(self.tutor_cache.load(root, dataset, run_cfg), device)
        elif mode.exists:
            tutor_model = load_classifier(self.tutor.path(root)).to(device)
            if mode is TutorMode.ONLINE:
                tutor = OnlineTutor(tutor_model, self.tutor_train)
            elif mode is TutorMode.REFRESH:
                tutor = RefreshTutor(tutor_model, self.tutor_train, self._refresher(run, tutor_model, dataset, run_cfg), device)
            else:
                tutor = FrozenModel(tutor_model)
        task = Task(teacher, tutor, make_policy(self.policy, self.policy_args), self.tau, self.alpha, self.loss,
                    self.loss_args)
        trainer = _trainer(run, student, tokenizer, dataset, task, self.train, self.seed, run_cfg, on_step)
        if self.data.lm:  # the teacher itself (not its cached targets), for the top-1 agreement
            trainer.reference = (teacher.model if isinstance(teacher, FrozenModel)
                                 else FrozenModel(load_classifier(self.teacher.path(root)).to(device)).model)
        result = trainer.fit()
        result.update({"params": param_count(student), "layers": depth(student), "policy": self.policy,
                       "targets": None if teacher is None else "cache" if self.teacher_cache else "live", "seed": self.seed,
                       "tutor_update": self.tutor_update, "iteration": self.iteration,
                       "data_fingerprints": dataset.fingerprints})
        return result

    def _build(self, root: Path, tokenizer):
        """The model this stage trains: a pruned copy of ``init_from``, a fresh one of its family
        (``arch``), or a pretrained decoder as it is (``layers`` None), which must tokenise like
        the teacher (checked at plan time where its tokenizer could be read offline, else here)."""
        from transformers import AutoConfig

        from .models import (fit_vocab, fresh, load_classifier, load_pretrained, load_tokenizer, resolve_pretrained,
                             shrink, tokenizer_difference)

        if self.arch is not None:
            family = AutoConfig.from_pretrained(self.init_from.path(root) if isinstance(self.init_from, ModelRef)
                                                else resolve_pretrained(self.init_from, lm=True))
            return fit_vocab(fresh(family, self.layers, self.arch, self.seed), tokenizer)
        if self.layers is None:
            if (diff := tokenizer_difference(load_tokenizer(self.init_from, lm=True), tokenizer,
                                             (self.init_from, "the teacher"))) is not None:
                raise ValueError(f"{self.init_from} does not tokenise like the teacher ({self.teacher.stage}): {diff}")
            return load_pretrained(self.init_from, self.data.num_labels, self.seed, lm=True)
        if isinstance(self.init_from, ModelRef):
            source = load_classifier(self.init_from.path(root))
        else:
            source = load_pretrained(self.init_from, self.data.num_labels, self.seed, lm=self.data.lm)
        return shrink(source, self.layers, self.init, self.seed)

    def _refresher(self, run: RunDir, tutor_model, dataset, run_cfg: RunConfig):
        """For ``tutor_update: refresh``: a function epoch -> the tutor's logit cache for that
        epoch, built from the tutor as it stands at the epoch's start, kept in ``tutor_cache/``
        so that a run resumed mid-epoch reads the same targets."""
        import shutil

        from .cache import CacheError, LogitCache, write_cache

        def make(epoch: int):
            folder = run.tutor_cache / f"epoch-{epoch:03d}"
            prod = {"weights": f"{self.key}@epoch{epoch}", "tokenizer": "", "max_length": self.data.max_length,
                    "dataset": self.data.name, "split": "train", "data": dataset.fingerprints["train"]}
            ids = dataset.encoded["train"].ids
            from . import distributed
            from .distributed import partitioned
            from .engine import plain_copy

            try:
                valid = LogitCache.open(folder, prod, ids)
            except CacheError:
                valid = None
            if distributed.broadcast(valid is not None):
                return valid
            distributed.barrier()
            if distributed.current().is_main:
                for old in run.tutor_cache.glob("epoch-*"):
                    if old != folder:
                        shutil.rmtree(old, ignore_errors=True)
            # under ZeRO-3 ranks would run different numbers of (collective) forward passes
            model = plain_copy(tutor_model).to(_device(run_cfg)) if partitioned(tutor_model) else tutor_model
            write_cache(folder, model, dataset.encoded["train"], prod, self.data.num_labels,
                        rows_per_shard=run_cfg.cache_rows_per_shard, device=_device(run_cfg))
            tutor_model.eval()
            return LogitCache.open(folder, prod, ids)

        return make
