"""Benchmark: what each way of getting a language model's targets costs per training step, on the
embedded SmolLM2-135M-Instruct teacher (issue 19). Ratios to the student's plain next-token step,
all measured side by side in one process (modes interleaved round-robin on the same batches, the
median of the rounds), as ``distill_speed.py`` does for the classifiers.

    python benchmarks/lm_speed.py [--student-layers 4] [--tutor-layers 15] [--max-length 32]
        [--batch-size 8] [--steps 3] [--rounds 3] [--device cpu|cuda] [--dtype fp32|bf16]

(a) student, next-token CE only (the floor)   (b) KD, teacher from the sparse cache (log8, k 64)
(c) KD, live dense teacher
(d) TEID, cached teacher + frozen tutor cached on the teacher's support
(e) TEID as the paper's Algorithm 2: live teacher + live online tutor
(f) TEID, cached teacher + live online tutor (the default tutor_update: online)
Also: what writing the cache costs per token against the teacher's forward pass alone, and the
share of batches on which the online tutor learnt (it takes a step only when the teacher wins).
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lm_common as lm  # noqa: E402

from hpc_kd.config import TrainConfig  # noqa: E402
from hpc_kd.data import eval_batches  # noqa: E402
from hpc_kd.loop import Trainer  # noqa: E402
from hpc_kd.models import shrink  # noqa: E402
from hpc_kd.policies import make_policy  # noqa: E402
from hpc_kd.rundir import RunDir  # noqa: E402
from hpc_kd.sources import CachedLogits, FrozenModel, OnlineTutor, forward  # noqa: E402
from hpc_kd.step import Task  # noqa: E402


def teacher_forward_seconds(model, encoded, device: str, dtype: str, batch_size: int) -> float:
    """The teacher's forward passes alone over the split, batched as the cache writer batches."""
    lm.sync(device)
    t0 = time.perf_counter()
    with torch.no_grad(), lm.autocast(device, dtype):
        for index in eval_batches(encoded.lengths, batch_size):
            batch = {k: v.to(device) for k, v in encoded.collate(index).items()}
            forward(model, batch).float()
    lm.sync(device)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="embedded", help="a causal LM: embedded (SmolLM2-135M-Instruct) or a folder")
    ap.add_argument("--student-layers", type=int, default=4)
    ap.add_argument("--tutor-layers", type=int, default=15)
    ap.add_argument("--max-length", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per mode per round")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds (after one warm-up round)")
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--precision", default="log8", choices=("log8", "float16", "float32"))
    ap.add_argument("--cache-batch-size", type=int, default=16, help="sequences per forward pass when writing the cache")
    lm.add_device_args(ap)
    args = ap.parse_args(argv)
    device = lm.device_of(args)
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="hpc_kd_lm_speed_"))
    teacher, tok, vocab = lm.load_teacher(args.teacher, device)
    n_train = args.batch_size * args.steps * (args.rounds + 1)  # every batch of the run is a different one
    data_cfg, dataset = lm.lm_dataset(tok, args.max_length, n_train, 8)
    train = dataset.encoded["train"]
    tokens = lm.tokens_of(train)
    sparse = lm.sparse_spec(args.k, args.precision)

    # The cache: its write (teacher forward + top-k + encode + Parquet) against the forward alone,
    # alternated twice; the last cache written is the one trained from.
    fwd, write = [], []
    for i in range(2):
        fwd.append(teacher_forward_seconds(teacher, train, device, args.dtype, args.cache_batch_size))
        seconds, teacher_cache = lm.write_sparse(tmp / f"teacher_{i}", teacher, data_cfg, dataset, "teacher", sparse,
                                                 vocab, device, args.dtype, batch_size=args.cache_batch_size)
        write.append(seconds)
    tutor0 = shrink(teacher, args.tutor_layers, "uniform", 1).to(device)
    _, tutor_cache = lm.write_sparse(tmp / "tutor", tutor0, data_cfg, dataset, "tutor", sparse, vocab, device,
                                     args.dtype, support=teacher_cache, batch_size=args.cache_batch_size)
    student0 = shrink(teacher, args.student_layers, "uniform", 0)
    cfg = TrainConfig(lr=5e-5, batch_size=args.batch_size, epochs=1)

    def cached(cache):
        return CachedLogits(cache, device)

    def online():
        return OnlineTutor(copy.deepcopy(tutor0), cfg)

    policy = lambda: make_policy("min_loss")  # noqa: E731
    modes = {
        "a": ("student next-token CE only (floor)", lambda: Task()),
        "b": ("KD, cached teacher", lambda: Task(cached(teacher_cache))),
        "c": ("KD, live teacher", lambda: Task(FrozenModel(teacher))),
        "d": ("TEID, cached teacher + frozen cached tutor", lambda: Task(cached(teacher_cache), cached(tutor_cache), policy())),
        "e": ("TEID, live teacher + live online tutor (Alg. 2)", lambda: Task(FrozenModel(teacher), online(), policy())),
        "f": ("TEID, cached teacher + live online tutor", lambda: Task(cached(teacher_cache), online(), policy())),
    }
    trainers = {key: Trainer(RunDir(tmp / f"run_{key}"), copy.deepcopy(student0), tok, dataset, make(), cfg, seed=0,
                             device=device) for key, (_, make) in modes.items()}
    batches = trainers["a"]._batches(0)
    med = lm.time_modes(trainers, lambda r: batches[r * args.steps:(r + 1) * args.steps], args.rounds, device, args.dtype)

    print(f"# {lm.machine(device)}; {args.dtype}")
    print(f"# teacher {args.teacher} ({teacher.config.num_hidden_layers} layers, vocabulary {vocab}), tutor "
          f"{args.tutor_layers} layers, student {args.student_layers} layers (uniform layers of the teacher); "
          f"{n_train} sequences cut at {args.max_length} tokens, batch {args.batch_size}; {args.rounds} rounds x "
          f"{args.steps} steps per mode after a warm-up round (median of rounds); cache top-{args.k} {args.precision}")
    print("| mode | s/step | ratio to (a) |")
    print("|---|---|---|")
    for key, (label, _) in modes.items():
        print(f"| ({key}) {label} | {med[key]:.4f} | {med[key] / med['a']:.3f} |")
    print(f"(e)/(d) = {med['e'] / med['d']:.2f}   (c)/(b) = {med['c'] / med['b']:.2f}   (b)/(a) = {med['b'] / med['a']:.3f}")
    for key in ("d", "e", "f"):
        sel = trainers[key].p.selection
        done = sel["teacher_batches"] + sel["tutor_batches"] + sel["mixed_batches"]
        print(f"({key}) teacher won {sel['teacher_batches']} of {done} batches, mixed {sel['mixed_batches']}"
              + (" (the online tutor learnt on those)" if key != "d" else ""))
    f, w = float(np.median(fwd)), float(np.median(write))
    print(f"cache write: {1e3 * w / tokens:.3f} ms/token (teacher forward + top-{args.k} + {args.precision} + Parquet), "
          f"teacher forward alone {1e3 * f / tokens:.3f} ms/token: write / forward = {w / f:.2f} "
          f"({tokens} tokens, median of 2 alternations); {lm.cache_bytes(teacher_cache) / tokens:.1f} bytes/token on disk")
    print(f"# total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
