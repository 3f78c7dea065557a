"""Benchmark: what each way of getting targets costs per training step, on the embedded
6 -> 5 -> 4 MiniLM chain. Prints ratios to plain CE fine-tuning of the student, all measured
side by side in this one process (modes interleaved round-robin, so drift hits all alike).

    python benchmarks/distill_speed.py [--steps 20] [--rounds 3] [--train 2000] [--pretrained embedded]
        [--device cpu|cuda] [--dtype fp32|bf16]

(a) student CE only (the floor)      (b) KD, teacher from cache      (c) KD, live teacher
(d) TEID, cached teacher + frozen cached tutor
(e) TEID as the paper's Algorithm 2: live teacher + live online tutor
(f) TEID, cached teacher + live online tutor
Also: the cache I/O share, the time to open, validate and read one epoch of teacher logits
relative to one epoch of (b).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import lm_common as bench  # noqa: E402  (the --device / --dtype flags)

from hpc_kd.cache import LogitCache, producer, write_cache  # noqa: E402
from hpc_kd.config import DataConfig, TrainConfig  # noqa: E402
from hpc_kd.data import Dataset, train_batches  # noqa: E402
from hpc_kd.loop import Trainer  # noqa: E402
from hpc_kd.sources import CachedLogits, FrozenModel, OnlineTutor  # noqa: E402
from hpc_kd.step import Task  # noqa: E402
from hpc_kd.models import load_classifier, load_pretrained, load_tokenizer, save_model, shrink  # noqa: E402
from hpc_kd.policies import make_policy  # noqa: E402
from hpc_kd.rundir import RunDir  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20, help="timed steps per mode per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--train", type=int, default=2000, help="training sentences (cache size)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--pretrained", default="embedded", help="embedded (the 6-layer MiniLM) or an encoder folder")
    bench.add_device_args(ap)
    args = ap.parse_args()
    device = bench.device_of(args)
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="hpc_kd_bench_"))
    data_cfg = DataConfig(max_train_examples=args.train, max_length=args.max_length)
    tok = load_tokenizer(args.pretrained)
    dataset = Dataset.build(data_cfg, tok)
    train = dataset.encoded["train"]
    # Timing does not depend on how well the models are trained: pretrained MiniLM with a head.
    teacher = load_pretrained(args.pretrained, 2, seed=0)
    depth = teacher.config.num_hidden_layers  # 6 embedded: a 6 -> 5 -> 4 chain
    models = {"teacher": teacher, "tutor": shrink(teacher, depth - 1, "uniform", 0)}
    caches = {}
    for name, model in models.items():
        save_model(model, tok, tmp / name)
        prod = producer(tmp / name, data_cfg.max_length, "embedded", "train", dataset.fingerprints["train"])
        with bench.autocast(device, args.dtype):
            write_cache(tmp / f"{name}_logits", model, train, prod, 2, device=device)
        caches[name] = (tmp / f"{name}_logits", prod)
    student0 = shrink(teacher.cpu(), depth - 2, "uniform", 0)
    cfg = TrainConfig(batch_size=args.batch_size, epochs=1)

    def cached(name):
        folder, prod = caches[name]
        return CachedLogits(LogitCache.open(folder, prod, train.ids), device)

    def live(name):
        return FrozenModel(load_classifier(tmp / name).to(device))

    def online():
        return OnlineTutor(load_classifier(tmp / "tutor").to(device), cfg)

    policy = lambda: make_policy("min_loss")  # noqa: E731
    modes = {
        "a": ("student CE only (floor)", lambda: Task()),
        "b": ("KD, cached teacher", lambda: Task(cached("teacher"))),
        "c": ("KD, live teacher", lambda: Task(live("teacher"))),
        "d": ("TEID, cached teacher + frozen cached tutor", lambda: Task(cached("teacher"), cached("tutor"), policy())),
        "e": ("TEID, live teacher + live online tutor (paper)", lambda: Task(live("teacher"), online(), policy())),
        "f": ("TEID, cached teacher + live online tutor", lambda: Task(cached("teacher"), online(), policy())),
    }
    trainers = {}
    for key, (_, make) in modes.items():
        trainers[key] = Trainer(RunDir(tmp / f"run_{key}"), copy.deepcopy(student0), tok, dataset, make(), cfg, seed=0,
                                device=device)
    batches = train_batches(train.lengths, cfg.batch_size, seed=0, epoch=0)
    med = bench.time_modes(trainers, lambda r: [batches[(r * args.steps + i) % len(batches)] for i in range(args.steps)],
                           args.rounds, device, args.dtype)

    # Cache I/O: open + validate + look up every batch of one epoch.
    folder, prod = caches["teacher"]
    t0 = time.perf_counter()
    cache = LogitCache.open(folder, prod, train.ids)
    for index in batches:
        cache.logits(torch.from_numpy(train.ids[index]))
    io_seconds = time.perf_counter() - t0
    epoch_b = med["b"] * len(batches)

    print(f"machine: {bench.machine(device)}; {args.dtype}; {args.pretrained} ({depth} -> {depth - 1} -> {depth - 2}); "
          f"{args.train} sentences, batch {cfg.batch_size}, "
          f"{args.rounds} rounds x {args.steps} steps per mode (median of rounds)")
    print(f"{'mode':<52} {'s/step':>8} {'ratio to (a)':>13}")
    for key, (label, _) in modes.items():
        print(f"({key}) {label:<48} {med[key]:8.4f} {med[key] / med['a']:13.3f}")
    print(f"(e)/(d) = {med['e'] / med['d']:.2f}   (c)/(b) = {med['c'] / med['b']:.2f}")
    print(f"cache I/O: {io_seconds * 1000:.1f} ms to open, validate and read one epoch of logits "
          f"= {100 * io_seconds / epoch_b:.2f}% of one epoch of (b) ({epoch_b:.1f} s)")
    size = sum(p.stat().st_size for p in folder.iterdir())
    print(f"teacher cache on disk: {size / 1024:.1f} KiB for {len(train)} examples")


if __name__ == "__main__":
    main()
