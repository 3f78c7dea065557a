"""Sweep file -> cells (one config per grid point) -> a deduplicated graph of stages.

A sweep file is an experiment config plus an optional ``grid:`` mapping dotted keys to lists::

    name: demo
    student: {layers: 4}
    grid:
      student.layers: [4, 3]
      distill.policy: [teacher, min_loss]

Each cell's chain is: fine-tune the teacher -> KD the tutor -> one student per TEID iteration.
Iteration k+1 takes iteration k's tutor as teacher (the updated one, in online mode) and its
student as tutor. Stages are keyed by signature, so shared ones (the teacher, the tutor) appear
once; the dict keeps insertion order, which is a topological order.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

from .config import (ConfigError, ExperimentConfig, RunConfig, check_tutor_depth, from_dict, looks_local,
                     parse_override, read_yaml, set_dotted)
from .losses import term_args
from .policies import POLICIES, policy_args
from .sources import TutorMode
from .stages import CacheLogits, Distill, FineTune, ModelRef, Stage


def tutor_mode(cfg: ExperimentConfig) -> TutorMode:
    """The students' tutor in this experiment: none for plain KD, else ``distill.tutor_update``."""
    return TutorMode.resolve(POLICIES[cfg.distill.policy].needs_tutor, cfg.distill.tutor_update)


@dataclass(frozen=True)
class Cell:
    values: dict  # the grid values of this cell, by dotted key
    config: ExperimentConfig
    chain: tuple[str, ...]  # stage keys: teacher, tutor, student of each iteration

    @property
    def tutor_mode(self) -> TutorMode:
        return tutor_mode(self.config)


@dataclass(frozen=True)
class Plan:
    name: str
    root: Path
    run: RunConfig
    stages: dict[str, Stage]
    cells: tuple[Cell, ...]
    grid_keys: tuple[str, ...]


def chain(cfg: ExperimentConfig) -> list[Stage]:
    """The stages of one cell, in dependency order."""
    d = cfg.distill
    stages: list[Stage] = []
    cached = d.targets == "cache"

    # a language model's caches hold sparse targets, tempered when written (so tau is theirs)
    sparse = ({"kind": d.sparse_targets, "k": d.sparse_k, "precision": d.sparse_precision, "tau": d.tau}
              if cfg.data.lm else None)

    def cache_of(ref: ModelRef, support: CacheLogits | None = None) -> CacheLogits | None:
        if not cached:
            return None
        stage = CacheLogits(cfg.data, ref, sparse=sparse, support=support)
        stages.append(stage)
        return stage

    teacher = FineTune(cfg.data, cfg.teacher.pretrained, cfg.teacher.layers, cfg.teacher.init,
                       cfg.teacher.seed, cfg.teacher.train)
    stages.append(teacher)
    teacher_ref = ModelRef(teacher.key)
    def source(init_from: str, teacher: ModelRef):
        return teacher if init_from == "teacher" else cfg.teacher.pretrained

    def built(section, layers: int) -> dict:
        """How a tutor or student is made: a pretrained decoder as it is, a fresh model of the
        teacher's family (sizes), or a pruned copy (layers chosen by init)."""
        if section.pretrained is not None:
            return {"init_from": section.pretrained, "layers": None, "init": "pretrained"}
        if section.config is not None:
            return {"init_from": teacher_ref, "layers": layers, "init": "random", "arch": section.config.sizes()}
        return {"init_from": source(section.init_from, teacher_ref), "layers": layers, "init": section.init}

    if not POLICIES[d.policy].needs_teacher:  # the baseline: no targets, no tutor; the teacher tokenises
        for iteration, depth in enumerate(cfg.student.layers, start=1):
            stages.append(Distill(cfg.data, teacher_ref, None, **built(cfg.student, depth), seed=cfg.seed,
                                  train=cfg.student.train, policy=d.policy, tau=1.0, alpha=0.0, loss="kl",
                                  role="student", iteration=iteration))
        return stages
    loss_args = term_args(d) or None
    tutor = Distill(cfg.data, teacher_ref, None, seed=cfg.tutor.seed, **built(cfg.tutor, cfg.tutor.layers),
                    train=cfg.tutor.train, policy="teacher", tau=d.tau, alpha=d.alpha, loss=d.loss,
                    teacher_cache=cache_of(teacher_ref), loss_args=loss_args, role="tutor")
    stages.append(tutor)
    tutor_ref = ModelRef(tutor.key)
    mode = tutor_mode(cfg)
    for iteration, depth in enumerate(cfg.student.layers, start=1):
        teacher_cache = cache_of(teacher_ref)
        # a language model's frozen tutor is cached on its teacher's support (like with like)
        tutor_cache = (cache_of(tutor_ref, support=teacher_cache if cfg.data.lm else None)
                       if mode.cached(d.targets) else None)
        student = Distill(
            cfg.data, teacher_ref, tutor_ref if mode.exists else None, **built(cfg.student, depth), seed=cfg.seed,
            train=cfg.student.train, policy=d.policy, tau=d.tau, alpha=d.alpha, loss=d.loss,
            tutor_update=mode.label,
            tutor_train=cfg.tutor.train if mode.learns else None,
            teacher_cache=teacher_cache, tutor_cache=tutor_cache, policy_args=policy_args(d) or None,
            loss_args=loss_args,
            role="student", iteration=iteration,
        )
        stages.append(student)
        # Next iteration: the tutor becomes the teacher, the student becomes the tutor.
        teacher_ref = ModelRef(student.key, "tutor") if mode.learns else tutor_ref
        tutor_ref = ModelRef(student.key)
    return stages


def check(cfg: ExperimentConfig, data_checked: set | None = None) -> ExperimentConfig:
    """What a config cannot check on its own: names against their registries and the disk (data
    files read and checked row by row, model folders, a pretrained model's depth). Raises
    ConfigError with the key path. ``data_checked``: data configs already read by this plan."""
    from .data import check_data
    from .losses import DISTILL_TERMS
    from .models import pretrained_depth, pretrained_vocab

    d = cfg.distill
    if d.policy not in POLICIES:
        raise ConfigError("distill.policy", f"unknown policy {d.policy!r}; allowed: {', '.join(POLICIES)}")
    if d.loss not in DISTILL_TERMS:
        raise ConfigError("distill.loss", f"unknown loss {d.loss!r}; allowed: {', '.join(DISTILL_TERMS)}")
    data = cfg.data
    if data.lm and d.tutor_update == "refresh":
        raise ConfigError("distill.tutor_update", "refresh is not built for task causal_lm (its per-epoch tutor cache "
                                                  "would be a sparse one on another support); use online or frozen")
    if data.lm and d.loss == "mse" and d.targets == "cache":
        raise ConfigError("distill.loss", "mse needs dense logits; a language model's cache holds sparse targets "
                                          "(use a divergence, or distill.targets: live)")
    if data.lm and d.targets == "cache" and d.sparse_targets == "sampled" and POLICIES[d.policy].needs_tutor:
        # the teacher's loss would be on draw frequencies (no tail), the tutor's on its true
        # probabilities: no tie for an identical tutor, so the comparison would not be fair
        raise ConfigError("distill.sparse_targets", f"sampled targets cannot be compared with a tutor (policy "
                                                    f"{d.policy!r}): a tutor equal to the teacher would not tie; use "
                                                    "top_k targets, distill.policy: teacher, or distill.targets: live")
    if data.source == "local":
        for key in ("train_file", "validation_file", "test_file"):
            value = getattr(data, key)
            if value is not None and not Path(value).expanduser().is_file():
                raise ConfigError(f"data.{key}", f"file not found: {value}")
    if data.source == "hf" and looks_local(data.name) and not Path(data.name).expanduser().exists():
        raise ConfigError("data.name", f"local dataset folder not found: {data.name}")
    if data_checked is None or data not in data_checked:
        check_data(data)
        if data_checked is not None:
            data_checked.add(data)
    pretrained = cfg.teacher.pretrained
    if looks_local(pretrained) and not Path(pretrained).expanduser().is_dir():
        raise ConfigError("teacher.pretrained", f"model folder not found: {pretrained}")
    pruned_tutor = cfg.tutor.pretrained is None and cfg.tutor.config is None
    if pruned_tutor and cfg.teacher.layers is None and (depth := pretrained_depth(pretrained, data.lm)) is not None:
        check_tutor_depth(cfg.tutor.layers, depth)
    for key, name in (("tutor.pretrained", cfg.tutor.pretrained), ("student.pretrained", cfg.student.pretrained)):
        if name is None:
            continue
        if looks_local(name) and not Path(name).expanduser().is_dir():
            raise ConfigError(key, f"model folder not found: {name}")
        if data_checked is None or ("tokenizer", pretrained, name) not in data_checked:
            check_tokenizer(key, pretrained, name)
            if data_checked is not None:
                data_checked.add(("tokenizer", pretrained, name))
    if data.chat and (data_checked is None or ("chat", pretrained, data) not in data_checked):
        check_chat(data, pretrained)
        if data_checked is not None:
            data_checked.add(("chat", pretrained, data))
    if data.lm and d.targets == "cache" and d.sparse_targets == "top_k" \
            and (vocab := pretrained_vocab(pretrained, data.lm)) is not None and d.sparse_k > vocab:
        raise ConfigError("distill.sparse_k", f"top_k of {d.sparse_k} tokens, but the vocabulary of {pretrained} "
                                              f"has {vocab}; at most {vocab}")
    return cfg


def check_chat(data, teacher: str) -> None:
    """Chat data against the teacher's tokenizer, when it can be read offline: a chat template to
    render with (the tokenizer's or data.chat_template), and with ``data.overlong: refuse`` no
    local conversation whose response cannot fit (every split rendered and tokenised here)."""
    from .data import Dataset, _template
    from .models import offline_tokenizer

    tokenizer = offline_tokenizer(teacher, lm=True)
    if tokenizer is None:
        return
    _template(tokenizer, data)
    if data.overlong == "refuse" and data.source == "local":
        Dataset.build(data, tokenizer)


def check_tokenizer(key: str, teacher: str, name: str) -> None:
    """Teacher, tutor and students must tokenise the same way (one vocabulary, the same ids and
    logits): refuse ``name`` (at ``key``) if its tokenizer differs from the teacher's. A tokenizer
    that cannot be read offline (a hub name not in the local cache, the embedded SmolLM2 not yet
    converted) is checked when its stage starts."""
    from .models import offline_tokenizer, tokenizer_difference

    ours, theirs = offline_tokenizer(name, lm=True), offline_tokenizer(teacher, lm=True)
    if ours is not None and theirs is not None and (diff := tokenizer_difference(ours, theirs, (name, teacher))):
        raise ConfigError(key, f"{name} does not tokenise like the teacher {teacher}: {diff}")


def experiment(data: dict, data_checked: set | None = None) -> ExperimentConfig:
    """One experiment config from plain data, checked completely (see :func:`check`)."""
    return check(from_dict(ExperimentConfig, data), data_checked)


def expand(data: dict) -> tuple[list[tuple[dict, ExperimentConfig]], tuple[str, ...]]:
    """Validate the base config and every grid point; return (values, config) per cell.

    ``grid`` is a mapping of dotted keys to lists (their product), or a list of such mappings
    (the union of their products, in order: e.g. every policy with the online tutor, plus
    ``min_loss`` with a frozen one)."""
    data = dict(data)
    grid = data.pop("grid", None) or {}
    grids = grid if isinstance(grid, list) else [grid]
    for i, part in enumerate(grids):
        where = f"grid[{i}]" if isinstance(grid, list) else "grid"
        if not isinstance(part, dict) or (isinstance(grid, list) and not part):
            raise ConfigError(where, "must map dotted config keys to lists of values (or be a list of such mappings)")
        for key, values in part.items():
            if not isinstance(key, str):
                raise ConfigError(f"{where}.{key}", "a grid axis must be a dotted config key such as distill.policy")
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{where}.{key}", "must be a non-empty list of values")
            if key.split(".")[0] in ("name", "output_root", "run"):
                raise ConfigError(f"{where}.{key}", "cannot be a grid axis (it does not define an experiment)")
    data_checked: set = set()
    experiment(data, data_checked)  # the base alone must be valid too
    cells, seen = [], set()
    for part in grids:
        for combo in itertools.product(*part.values()):
            cell_data, values = data, {}
            for key, value in zip(part, combo):
                cell_data = set_dotted(cell_data, key, value)
                values[key] = value
            marker = repr(sorted(values.items()))
            if marker not in seen:  # a point in two parts of a union is one cell
                seen.add(marker)
                cells.append((values, experiment(cell_data, data_checked)))
    return cells, tuple(dict.fromkeys(key for part in grids for key in part))


def override(data: dict, key: str, value) -> dict:
    """``data`` with one command-line override applied. ``grid.<dotted key>=[...]`` sets that grid
    axis (in every part of a union), whose key itself has dots: ``grid.distill.policy=[teacher]``;
    ``grid=null`` drops the grid."""
    if key.startswith("grid.") and isinstance(data.get("grid"), (dict, list)):
        axis = key[len("grid."):]
        grid = data["grid"]
        parts = [dict(p) if isinstance(p, dict) else p for p in (grid if isinstance(grid, list) else [grid])]
        for part in parts:
            if isinstance(part, dict):
                part[axis] = value
        return {**data, "grid": parts if isinstance(grid, list) else parts[0]}
    if key.startswith("grid."):
        return {**data, "grid": {key[len("grid."):]: value}}
    return set_dotted(data, key, value)


def load_plan(path: str | Path, overrides: list[str] = ()) -> Plan:
    data = read_yaml(path)
    if not data:
        raise ConfigError("", f"{path} is empty: a sweep file needs at least a name (see jobs/demo.yaml)")
    for text in overrides:
        data = override(data, *parse_override(text))
    cells, grid_keys = expand(data)
    return build_plan(cells, grid_keys)


def build_plan(cells, grid_keys=()) -> Plan:
    stages: dict[str, Stage] = {}
    built = []
    for values, cfg in cells:
        keys = []
        for stage in chain(cfg):
            stages.setdefault(stage.key, stage)
            keys.append(stage.key)
        built.append(Cell(values, cfg, tuple(keys)))
    first = built[0].config
    return Plan(first.name, first.run_root, first.run, stages, tuple(built), tuple(grid_keys))
