"""Shared fixtures: a tiny random-initialised BERT (hidden 32) with a small word-level vocabulary
built from the embedded sentences, so the whole suite trains real models in seconds; the plan of
a tiny experiment (:func:`make_plan`) and the one way tests run a plan here (:func:`run_plan`);
snapshots (:func:`assert_snapshot`)."""
from __future__ import annotations

import collections
import os
import re
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HPC_KD_NO_PROGRESS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY_LAYERS = 4
SNAPSHOTS = Path(__file__).parent / "snapshots"
#: set to 1 to write the snapshots the tests produce (new ones, or a deliberate change: review
#: the diff and commit it)
UPDATE_SNAPSHOTS = "HPC_KD_UPDATE_SNAPSHOTS"


def build_tiny_model(path: Path, layers: int = TINY_LAYERS) -> Path:
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    from hpc_kd.data import load_splits
    from hpc_kd.config import DataConfig

    words = collections.Counter()
    for text in load_splits(DataConfig())["train"].texts:
        words.update(re.findall(r"\w+|[^\w\s]", text.lower()))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [w for w, _ in words.most_common(2000)]
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # transformers 5 builds a fast tokenizer from a ``vocab`` mapping and silently keeps only the
    # special tokens when given a ``vocab_file`` (every word was [UNK]); transformers 4 the reverse
    tokenizer = BertTokenizerFast(vocab={word: i for i, word in enumerate(vocab)}, do_lower_case=True)
    if tokenizer.tokenize("a funny film") != ["a", "funny", "film"]:
        tokenizer = BertTokenizerFast(vocab_file=str(path / "vocab.txt"), do_lower_case=True)
    assert tokenizer.tokenize("a funny film") == ["a", "funny", "film"], "the tiny tokenizer lost its vocabulary"
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def require_slurm() -> None:
    """Skip a SLURM test where no SLURM is installed, with how to get one; under CI
    (``HPC_KD_REQUIRE_SLURM=1``, set by .ci/run) fail instead, so a lost cluster can't pass."""
    import shutil

    import subprocess

    if shutil.which("sinfo") is None:
        message = "SLURM is not installed here (no sinfo on PATH); bring it up with: bash slurm/up.sh"
    else:
        try:
            out = subprocess.run(["sinfo", "-h", "-o", "%a"], capture_output=True, text=True, timeout=30)
            answer = out.stderr.strip() if out.returncode else None
        except subprocess.TimeoutExpired:
            answer = "sinfo got no answer in 30 s"
        if answer is None:
            return
        message = f"SLURM is installed but its controller does not answer ({answer}); start it with: bash slurm/up.sh"
    if os.environ.get("HPC_KD_REQUIRE_SLURM") == "1":
        pytest.fail(message)
    pytest.skip(message)


def build_tiny_decoder(path: Path, layers: int = TINY_LAYERS) -> Path:
    """A tiny random-initialised Llama (hidden 32) with the word-level tokenizer of the tiny BERT:
    a decoder for the language-model tests."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    build_tiny_model(path, layers)  # the tokenizer files (and a BERT we replace)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    for name in ("model.safetensors", "config.json"):
        (path / name).unlink()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_decoder(tmp_path_factory) -> Path:
    return build_tiny_decoder(tmp_path_factory.mktemp("tiny_decoder") / "llama")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "bert")


@pytest.fixture(scope="session")
def glue_files(tmp_path_factory) -> dict[str, str]:
    """Small GLUE-like local files built from the embedded sentences (so the tiny model's vocabulary
    covers them), with GLUE's column names: an MRPC-like pair task (``sentence1``, ``sentence2``,
    ``label`` 1 when both sentences share a sentiment) with a second evaluation file, and an
    STS-B-like regression (``label`` a real score in [0, 5.5), higher for two positive sentences)."""
    import numpy as np
    import pandas as pd

    from hpc_kd.config import DataConfig
    from hpc_kd.data import load_splits

    folder = tmp_path_factory.mktemp("glue")
    split = load_splits(DataConfig())["train"]
    rng = np.random.default_rng(0)
    files = {}
    for name, rows in (("train", 96), ("validation", 48), ("mismatched", 32)):
        a, b = rng.integers(0, len(split), rows), rng.integers(0, len(split), rows)
        pair = pd.DataFrame({"sentence1": [split.texts[i] for i in a], "sentence2": [split.texts[i] for i in b],
                             "label": (split.labels[a] == split.labels[b]).astype(int)})
        files[f"pair_{name}"] = str(folder / f"pair_{name}.csv")
        pair.to_csv(files[f"pair_{name}"], index=False)
        if name != "mismatched":
            sts = pair.assign(label=(2.5 * (split.labels[a] + split.labels[b]) + rng.uniform(0, 0.5, rows)).round(2))
            files[f"sts_{name}"] = str(folder / f"sts_{name}.csv")
            sts.to_csv(files[f"sts_{name}"], index=False)
    return files


def glue_data(files: dict, task: str, **extra) -> dict:
    """The data section of a local pair (``task="mrpc"``, with its second evaluation file) or
    regression (``"stsb"``) task: the GLUE preset fills the columns, labels and metric."""
    prefix = "pair" if task == "mrpc" else "sts"
    data = {"source": "local", "name": f"glue/{task}", "train_file": files[f"{prefix}_train"],
            "validation_file": files[f"{prefix}_validation"], "max_length": 32, **extra}
    if task == "mrpc":
        data["also_evaluate"] = [files["pair_mismatched"]]
    return data


def tiny_config(tiny_model: Path, root: Path, **sections) -> dict:
    """A small experiment config (as plain data) on the embedded sentences with the tiny model."""
    cfg = {
        "name": "t",
        "output_root": str(root),
        "data": {"max_train_examples": 96, "max_eval_examples": 48, "max_length": 24},
        "teacher": {"pretrained": str(tiny_model), "train": {"lr": 1e-3, "batch_size": 16, "epochs": 2}},
        "tutor": {"layers": 3, "train": {"lr": 1e-3, "batch_size": 16, "epochs": 2}},
        "student": {"layers": [2], "train": {"lr": 1e-3, "batch_size": 16, "epochs": 2, "patience": 2}},
        "distill": {"policy": "min_loss", "tau": 2.0, "alpha": 0.5},
        "run": {"progress": False, "checkpoint_every": 2, "log_every": 2},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            cfg[key] = {**cfg.get(key, {}), **value}
        else:
            cfg[key] = value
    return cfg


def plan_of(cfg: dict):
    """The plan of one experiment given as plain data (no grid)."""
    from hpc_kd.config import ExperimentConfig, from_dict
    from hpc_kd.plan import build_plan

    return build_plan([({}, from_dict(ExperimentConfig, cfg))])


def make_plan(tiny_model: Path, root: Path, **sections):
    """The plan of one tiny experiment (:func:`tiny_config` with ``sections``)."""
    return plan_of(tiny_config(tiny_model, root, **sections))


def run_plan(plan, on_step=None, only=None) -> dict:
    """Run ``plan``'s stages (those in ``only``, default all) in order in this process, each with
    the step hook ``on_step``; return stage key -> result."""
    return {key: stage(plan.root, plan.run, on_step=on_step) for key, stage in plan.stages.items()
            if only is None or key in only}


def assert_snapshot(name: str, text: str) -> None:
    """``text`` must equal ``tests/snapshots/<name>``. With HPC_KD_UPDATE_SNAPSHOTS=1 the file is
    written first (a new snapshot, or a deliberate change to accept), so review the diff and commit
    it; without it, a missing snapshot fails."""
    path = SNAPSHOTS / name
    if os.environ.get(UPDATE_SNAPSHOTS) == "1":
        path.write_text(text)
    if not path.exists():
        pytest.fail(f"snapshot {path} is missing: write it with {UPDATE_SNAPSHOTS}=1, review it and commit it")
    assert text == path.read_text(), f"{name} differs from its snapshot ({UPDATE_SNAPSHOTS}=1 accepts the change)"


def process_env(**extra) -> dict:
    """This process's environment for a child process, without the rank variables a one-rank
    DeepSpeed stage run in this process leaves behind (``LOCAL_RANK``, which would make the child
    think it is a rank of a distributed job), plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, **extra}


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def strip_times(result: dict) -> dict:
    """A result without its wall-clock field, for exact comparisons between runs."""
    return {k: v for k, v in result.items() if k != "train_seconds"}


class Killed(Exception):
    """Raised from a step hook to simulate a job killed mid-run."""


def interrupt_and_resume(plan, key: str, at_step: int) -> dict:
    """Run the stages ``key`` needs, kill ``key`` right after optimiser step ``at_step``, check
    it left a checkpoint and no result, resume it, and return the resumed result."""
    keys = list(plan.stages)
    run_plan(plan, only=keys[: keys.index(key)])

    def kill(trainer, record):
        if trainer.p.step == at_step:
            raise Killed

    with pytest.raises(Killed):
        plan.stages[key](plan.root, plan.run, on_step=kill)
    run = plan.stages[key].run_dir(plan.root)
    assert run.checkpoint.exists() and not run.done()
    return plan.stages[key](plan.root, plan.run)
