"""Benchmark: what a second rank costs on CPU. Fine-tuning steps of the embedded MiniLM teacher
(6 layers) at one global batch, timed three ways on the same total number of cores:

    1 rank, plain loop             (hpc_kd.loop.Trainer, --threads threads)
    1 rank, DeepSpeed ZeRO-<z>     (hpc_kd.engine.EngineTrainer, --threads threads)
    2 ranks, DeepSpeed ZeRO-<z>    (torch.distributed.run, gloo, --threads/2 threads each)

Each rank runs the loop's own step (collate, forward, backward, gradient all-reduce, optimiser,
the loss all-reduce); a step's time is the slowest rank's. Launches alternate round by round so
that drift in the machine's load hits all alike; the median over rounds is reported, then the
ratio of 2 ranks to 1 rank (>1: slower with two ranks on the same cores).

    python benchmarks/distributed_overhead.py [--steps 10] [--warmup 3] [--rounds 2] [--batch-size 32] [--zero 0] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HPC_KD_NO_PROGRESS", "1")

MODES = ("1 rank, plain", "1 rank, deepspeed", "2 ranks, deepspeed")


def worker(args) -> None:
    """One rank of one measurement: prints a JSON line (rank 0) with seconds per step."""
    import torch

    from hpc_kd import distributed
    from hpc_kd.config import DataConfig, DeepSpeedConfig, TrainConfig
    from hpc_kd.data import Dataset
    from hpc_kd.loop import Trainer
    from hpc_kd.step import Task
    from hpc_kd.models import load_pretrained, load_tokenizer
    from hpc_kd.rundir import RunDir

    torch.set_num_threads(args.threads)
    world = distributed.detect()
    deepspeed = DeepSpeedConfig(zero_stage=args.zero) if args.mode != "plain" else None
    cfg = TrainConfig(lr=5e-5, batch_size=args.batch_size, epochs=1, deepspeed=deepspeed)
    tok = load_tokenizer("embedded")
    needed = args.batch_size * (args.warmup + args.steps)
    dataset = Dataset.build(DataConfig(max_train_examples=needed, max_eval_examples=64, max_length=64), tok)
    run = RunDir(Path(tempfile.mkdtemp(prefix="hpc_kd_bench_dist_")))
    with distributed.session(world, "cpu"):
        if deepspeed is None:
            trainer = Trainer(run, load_pretrained("embedded", 2, 0), tok, dataset, Task(), cfg, 0)
        else:
            from hpc_kd.engine import EngineTrainer

            trainer = EngineTrainer(distributed.for_this_rank(run), load_pretrained("embedded", 2, 0), tok, dataset,
                                    Task(), cfg, 0)
        batches = trainer._batches(0)
        for index in batches[: args.warmup]:
            trainer._train_step(index)
        distributed.barrier()
        start = time.perf_counter()
        for index in batches[args.warmup: args.warmup + args.steps]:
            trainer._train_step(index)
        elapsed = time.perf_counter() - start
        slowest = max(distributed.all_gather_object(elapsed))
        if world.is_main:
            print("RESULT " + json.dumps({"mode": args.mode, "ranks": world.size, "s_per_step": slowest / args.steps}), flush=True)


def launch(args, mode: str) -> float:
    ranks = 2 if mode.startswith("2") else 1
    kind = "plain" if mode.endswith("plain") else "deepspeed"
    threads = max(1, args.threads // ranks)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", f"--master_port={port}",
           __file__, "--worker", "--mode", kind, "--threads", str(threads), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--batch-size", str(args.batch_size), "--zero", str(args.zero)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"{mode} failed:\n{(out.stdout + out.stderr)[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])["s_per_step"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10, help="timed optimiser steps per launch")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32, help="the global batch")
    ap.add_argument("--zero", type=int, default=0, choices=(0, 1, 2, 3))
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="cores in all (split between ranks)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="plain", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    times = {mode: [] for mode in MODES}
    for _ in range(args.rounds):
        for mode in MODES:
            times[mode].append(launch(args, mode))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {load:.1f}; "
          f"MiniLM 6 layers, max_length 64, global batch {args.batch_size}, ZeRO-{args.zero}, {args.threads} thread(s) in all, split between ranks (at least 1 each), "
          f"{args.steps} steps x {args.rounds} rounds (median)")
    print("| mode | threads per rank | s/step | ratio to 1 rank, plain |")
    print("|---|---|---|---|")
    base = statistics.median(times[MODES[0]])
    for mode in MODES:
        t = statistics.median(times[mode])
        per_rank = max(1, args.threads // (2 if mode.startswith("2") else 1))
        print(f"| {mode} | {per_rank} | {t:.3f} | {t / base:.2f} |")
    two, one = statistics.median(times[MODES[2]]), statistics.median(times[MODES[1]])
    print(f"overhead ratio, 2 ranks / 1 rank (both DeepSpeed): {two / one:.2f}")


if __name__ == "__main__":
    main()
