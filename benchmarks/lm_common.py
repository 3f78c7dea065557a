"""What the language-model benchmarks share (``lm_fidelity.py``, ``lm_speed.py``): the device and
dtype flags, the teacher and the corpus, and sparse teacher caches written with the cache's own
writer (``hpc_kd.cache``) into a scratch folder.

``--dtype bf16`` runs every forward pass (training, cache writing, evaluation) under
``torch.autocast`` in bfloat16: the weights, the optimiser and the losses stay float32 (the
step casts logits to float32), which is how mixed precision trains on a GPU.
"""
from __future__ import annotations

import contextlib
import os
import platform
import time

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def add_device_args(ap) -> None:
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"),
                    help="bf16: forward passes under torch.autocast (weights and optimiser in float32)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")


def device_of(args) -> str:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device (torch.cuda.is_available() is False)")
    return args.device


def autocast(device: str, dtype: str):
    """A context for forward passes: bf16 autocast, or nothing (fp32)."""
    if dtype == "bf16":
        return torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def machine(device: str) -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    where = (torch.cuda.get_device_name() if device.startswith("cuda")
             else f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads")
    return f"{where}; torch {torch.__version__}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"


def load_teacher(name: str, device: str):
    """The teacher (a causal LM: ``embedded`` is SmolLM2-135M-Instruct), its tokenizer and vocabulary size."""
    from hpc_kd.models import load_pretrained, load_tokenizer

    teacher = load_pretrained(name, 2, 0, lm=True).eval().to(device)
    tokenizer = load_tokenizer(name, lm=True)
    return teacher, tokenizer, int(teacher.get_output_embeddings().out_features)


def lm_dataset(tokenizer, max_length: int, train: int, evaluate: int):
    """The embedded movie reviews as a corpus (the LM demo's data), ``train`` sequences for
    training and ``evaluate`` for validation, each cut at ``max_length`` tokens."""
    from hpc_kd.config import DataConfig
    from hpc_kd.data import Dataset

    cfg = DataConfig(task="causal_lm", source="embedded", name="movie_reviews", max_length=max_length,
                     max_train_examples=train, max_eval_examples=evaluate)
    return cfg, Dataset.build(cfg, tokenizer)


def producer_of(label: str, data_cfg, dataset) -> dict:
    """A producer fingerprint naming the model by ``label`` (scratch caches: nothing is saved to
    hash), the data by its content fingerprint, as a stage's cache has."""
    return {"weights": label, "tokenizer": "", "max_length": data_cfg.max_length,
            "dataset": f"{data_cfg.source}:{data_cfg.name}", "split": "train", "data": dataset.fingerprints["train"]}


def sparse_spec(k: int, precision: str, tau: float = 1.0) -> dict:
    return {"kind": "top_k", "k": k, "precision": precision, "tau": tau}


def write_sparse(folder, model, data_cfg, dataset, label: str, sparse: dict, vocab: int, device: str, dtype: str,
                 support=None, batch_size: int = 16):
    """Write ``model``'s sparse targets over the training split with ``hpc_kd.cache.write_cache``
    (a frozen tutor's ``support``: its teacher's opened cache); return (seconds, opened cache)."""
    from hpc_kd.cache import write_cache

    prod = producer_of(label, data_cfg, dataset)
    sync(device)
    t0 = time.perf_counter()
    with autocast(device, dtype):
        write_cache(folder, model, dataset.encoded["train"], prod, vocab, sparse=sparse, support=support,
                    device=device, batch_size=batch_size)
    sync(device)
    seconds = time.perf_counter() - t0
    return seconds, open_sparse(folder, data_cfg, dataset, label, sparse, vocab)


def open_sparse(folder, data_cfg, dataset, label: str, sparse: dict, vocab: int):
    from hpc_kd.cache import SparseLogitCache

    return SparseLogitCache.open(folder, producer_of(label, data_cfg, dataset), dataset.encoded["train"].ids, sparse, vocab)


def reencode(src_folder, folder, data_cfg, dataset, label: str, src_sparse: dict, sparse: dict, vocab: int):
    """A cache at ``sparse``'s precision holding the same top-k targets as the float32 cache at
    ``src_folder`` (what a second teacher pass would write: the writer encodes float32 top-k
    values), through the cache's own table and shard writer; returns the opened cache."""
    from hpc_kd.cache import SPARSE_PARQUET, _write_shards, finalize, sparse_table
    from hpc_kd.sparse import SparseTargets

    assert src_sparse["precision"] == "float32" and {**src_sparse, "precision": sparse["precision"]} == sparse
    src = open_sparse(src_folder, data_cfg, dataset, label, src_sparse, vocab)
    encoded = dataset.encoded["train"]
    prod = producer_of(label, data_cfg, dataset)

    def table(rows: np.ndarray, index: int):
        spans = [src.starts[int(encoded.ids[r])] for r in rows]
        take = torch.cat([torch.arange(s, s + c) for s, c in spans])
        flat = SparseTargets(*(src.table[c][take] for c in ("ids", "log_probs", "tail")))
        return sparse_table(np.repeat(encoded.ids[rows], [c for _, c in spans]), flat, sparse["precision"], vocab)

    _write_shards(folder, encoded, prod, table, rows_per_shard=4096, rank=0, world_size=1, progress=False,
                  unit="seq", parquet=SPARSE_PARQUET)
    finalize(folder, prod, vocab, 1, sparse)
    return open_sparse(folder, data_cfg, dataset, label, sparse, vocab)


def cache_bytes(cache) -> int:
    return int(cache.manifest["bytes"])


def tokens_of(encoded) -> int:
    """Predicted tokens of a split (a sequence of n tokens predicts n − 1)."""
    return int(np.maximum(encoded.lengths - 1, 0).sum())


def time_modes(trainers: dict, chunk_of, rounds: int, device: str, dtype: str) -> dict:
    """Median seconds per step of each trainer (mode), the modes interleaved round-robin so that
    drift hits all alike: in round r every trainer takes the batches ``chunk_of(r)`` (round 0 warms
    up and is not counted)."""
    import statistics
    import time

    per_step = {key: [] for key in trainers}
    for round_ in range(rounds + 1):
        chunk = chunk_of(round_)
        for key, trainer in trainers.items():
            sync(device)
            t0 = time.perf_counter()
            with autocast(device, dtype):
                for index in chunk:
                    trainer._train_step(index)
                    trainer.p.step += 1  # as the loop counts (the tutor's rate is its schedule at this step)
            sync(device)
            if round_ > 0:
                per_step[key].append((time.perf_counter() - t0) / len(chunk))
    return {key: statistics.median(v) for key, v in per_step.items()}
