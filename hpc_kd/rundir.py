"""A run's folder: ``<root>/runs/<kind>-<signature>/``.

It holds ``config.json`` (the stage's settings, enough to rebuild it), ``metrics.jsonl``
(append-only records), ``result.json`` (written last: its presence means "done"), ``model/``
and ``checkpoint.pt``. Every file is written to a temporary name and renamed. Nothing here is
loaded with pickle: JSON for records, safetensors / ``torch.load(weights_only=True)`` for tensors.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from .config import SCHEMA_VERSION


def signature(settings: dict) -> str:
    """Hash of the settings that change a result, plus the schema version."""
    blob = json.dumps({"schema": SCHEMA_VERSION, **settings}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def write_atomic(path: Path, data: bytes | str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: Path):
    return json.loads(Path(path).read_text())


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def model(self) -> Path:
        return self.path / "model"

    @property
    def tutor(self) -> Path:
        """The tutor as it ended a TEID run (updated in online mode)."""
        return self.path / "tutor"

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint.pt"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    def done(self) -> bool:
        return (self.path / "result.json").is_file()

    def result(self) -> dict:
        return read_json(self.path / "result.json")

    def config(self) -> dict:
        return read_json(self.path / "config.json")

    def start(self, config: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_json(self.path / "config.json", config)

    def finish(self, result: dict) -> None:
        write_json(self.path / "result.json", result)
        self.checkpoint.unlink(missing_ok=True)

    # metrics.jsonl: appended one line per record; on resume it is cut back to the number of
    # records the checkpoint knew about, so a resumed run's file equals an uninterrupted one's.
    def append_metrics(self, record: dict) -> None:
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()

    def metrics(self) -> list[dict]:
        if not self.metrics_file.exists():
            return []
        return [json.loads(line) for line in self.metrics_file.read_text().splitlines() if line.strip()]

    def truncate_metrics(self, count: int) -> None:
        lines = self.metrics_file.read_text().splitlines(keepends=True) if self.metrics_file.exists() else []
        write_atomic(self.metrics_file, "".join(lines[:count]))

    def save_checkpoint(self, state: dict) -> None:
        tmp = self.checkpoint.with_name(f".checkpoint.pt.tmp{os.getpid()}")
        torch.save(state, tmp)
        os.replace(tmp, self.checkpoint)

    def load_checkpoint(self) -> dict | None:
        if not self.checkpoint.exists():
            return None
        return torch.load(self.checkpoint, weights_only=True, map_location="cpu")
