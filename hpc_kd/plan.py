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

from .config import ConfigError, ExperimentConfig, RunConfig, from_dict, parse_override, read_yaml, set_dotted
from .policies import POLICIES
from .stages import CacheLogits, Distill, FineTune, ModelRef, Stage


@dataclass(frozen=True)
class Cell:
    values: dict  # the grid values of this cell, by dotted key
    config: ExperimentConfig
    chain: tuple[str, ...]  # stage keys: teacher, tutor, student of each iteration


@dataclass(frozen=True)
class Plan:
    name: str
    root: Path
    run: RunConfig
    stages: dict[str, Stage]
    cells: tuple[Cell, ...]
    grid_keys: tuple[str, ...]

    def dependents(self, key: str) -> list[str]:
        """Every stage that needs ``key``, directly or not."""
        out, frontier = [], {key}
        for k, stage in self.stages.items():
            if any(ref.stage in frontier for ref in stage.inputs()):
                out.append(k)
                frontier.add(k)
        return out


def chain(cfg: ExperimentConfig) -> list[Stage]:
    """The stages of one cell, in dependency order."""
    d = cfg.distill
    stages: list[Stage] = []
    cached = d.targets == "cache"

    def cache_of(ref: ModelRef) -> CacheLogits | None:
        if not cached:
            return None
        stage = CacheLogits(cfg.data, ref)
        stages.append(stage)
        return stage

    teacher = FineTune(cfg.data, cfg.teacher.pretrained, cfg.teacher.layers, cfg.teacher.init,
                       cfg.teacher.seed, cfg.teacher.train)
    stages.append(teacher)
    teacher_ref = ModelRef(teacher.key)
    def source(init_from: str, teacher: ModelRef):
        return teacher if init_from == "teacher" else cfg.teacher.pretrained

    tutor = Distill(cfg.data, teacher_ref, None, source(cfg.tutor.init_from, teacher_ref), cfg.tutor.layers, cfg.tutor.init, cfg.tutor.seed,
                    cfg.tutor.train, "teacher", d.tau, d.alpha, d.loss, teacher_cache=cache_of(teacher_ref), role="tutor")
    stages.append(tutor)
    tutor_ref = ModelRef(tutor.key)
    plain_kd = POLICIES[d.policy].teacher_only
    learning = d.tutor_update in ("online", "refresh") and not plain_kd
    for iteration, depth in enumerate(cfg.student.layers, start=1):
        teacher_cache = cache_of(teacher_ref)
        tutor_cache = cache_of(tutor_ref) if d.tutor_update == "frozen" and not plain_kd else None
        student = Distill(
            cfg.data, teacher_ref, None if plain_kd else tutor_ref, source(cfg.student.init_from, teacher_ref), depth,
            cfg.student.init, cfg.seed,
            cfg.student.train, d.policy, d.tau, d.alpha, d.loss,
            tutor_update=None if plain_kd else d.tutor_update,
            tutor_train=cfg.tutor.train if learning else None,
            teacher_cache=teacher_cache, tutor_cache=tutor_cache, policy_args=d.policy_args() or None,
            role="student", iteration=iteration,
        )
        stages.append(student)
        # Next iteration: the tutor becomes the teacher, the student becomes the tutor.
        teacher_ref = ModelRef(student.key, "tutor") if learning else tutor_ref
        tutor_ref = ModelRef(student.key)
    return stages


def expand(data: dict) -> tuple[list[tuple[dict, ExperimentConfig]], tuple[str, ...]]:
    """Validate the base config and every grid point; return (values, config) per cell."""
    data = dict(data)
    grid = data.pop("grid", None) or {}
    if not isinstance(grid, dict):
        raise ConfigError("grid", "must map dotted config keys to lists of values")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"grid.{key}", "must be a non-empty list of values")
        if key.split(".")[0] in ("name", "output_root", "run"):
            raise ConfigError(f"grid.{key}", "cannot be a grid axis (it does not define an experiment)")
    from_dict(ExperimentConfig, data)  # the base alone must be valid too
    cells = []
    for combo in itertools.product(*grid.values()):
        cell_data, values = data, {}
        for key, value in zip(grid, combo):
            cell_data = set_dotted(cell_data, key, value)
            values[key] = value
        cells.append((values, from_dict(ExperimentConfig, cell_data)))
    return cells, tuple(grid)


def load_plan(path: str | Path, overrides: list[str] = ()) -> Plan:
    data = read_yaml(path)
    for text in overrides:
        key, value = parse_override(text)
        data = set_dotted(data, key, value)
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
