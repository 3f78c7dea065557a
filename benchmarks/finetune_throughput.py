"""Benchmark: single-device throughput of teacher fine-tuning, hpc_kd against the Hugging Face
``Trainer`` on the same model, data and batch size (issue 6).

Four ways to run the same optimiser steps (AdamW, lr 5e-5, weight decay, linear warm-up/decay,
gradient clipping at 1.0; fresh classification head from the same seed):

    hpc_kd loop               hpc_kd.loop.Trainer: the single-process path (fp32 only)
    hpc_kd DeepSpeed          hpc_kd.engine.EngineTrainer on 1 rank, ZeRO-<z>, --precision
    HF Trainer, same batches  transformers.Trainer fed hpc_kd's batches in hpc_kd's order
                              (a sequential sampler over the examples laid out batch by batch):
                              identical tensors, so only the frameworks differ
    HF Trainer, default       transformers.Trainer as a user would start it: random batches,
                              padded by DataCollatorWithPadding (more padding per batch)

Each measurement runs in a fresh process: --warmup steps, then --steps timed steps (CUDA
synchronised at both ends); modes alternate round by round and the median over rounds is
reported with examples/s, padded tokens per step and, on a GPU, peak memory. The last lines are the ratios of hpc_kd to the HF Trainer
(same batches): above 1, hpc_kd is faster.

    python benchmarks/finetune_throughput.py [--device auto|cuda|cpu] [--precision fp32|bf16|fp16]
        [--pretrained embedded|bert-base-uncased|PATH] [--source embedded|hf] [--max-length 128] [--batch-size 32]
        [--steps 50] [--warmup 5] [--rounds 3] [--zero 0]

Needs ``accelerate`` (the HF Trainer's own dependency): ``pip install -e '.[test]'``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HPC_KD_NO_PROGRESS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch

MODES = ("hpc_kd loop", "hpc_kd DeepSpeed", "HF Trainer, same batches", "HF Trainer, default")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak_reset(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


class Setup:
    """What every mode shares: tokenizer, the tokenised training examples, hpc_kd's batches."""

    def __init__(self, args):
        from hpc_kd.config import DataConfig, TrainConfig
        from hpc_kd.data import Dataset, train_batches
        from hpc_kd.models import load_tokenizer

        self.args = args
        self.tokenizer = load_tokenizer(args.pretrained)
        needed = args.batch_size * (args.warmup + args.steps)
        extra = {} if args.source == "embedded" else {"name": args.dataset, "text_column": args.text_column}
        data_cfg = DataConfig(source=args.source, max_train_examples=needed, max_eval_examples=64,
                              max_length=args.max_length, **extra)
        self.dataset = Dataset.build(data_cfg, self.tokenizer)
        self.train_cfg = TrainConfig(lr=5e-5, batch_size=args.batch_size, epochs=1)
        if len(self.dataset.encoded["train"]) < needed:
            raise SystemExit(f"only {len(self.dataset.encoded['train'])} training examples; need {needed}")
        # hpc_kd's first epoch of batches (the loop's own order), used by every hpc_kd mode and "same batches"
        lengths = self.dataset.encoded["train"].lengths
        self.batches = train_batches(lengths, args.batch_size, 0, 0)[: args.warmup + args.steps]

    def model(self):
        from hpc_kd.models import load_pretrained

        return load_pretrained(self.args.pretrained, self.dataset.num_labels, 0)

    def padded_tokens(self, batches) -> float:
        lengths = self.dataset.encoded["train"].lengths
        timed = batches[self.args.warmup:]
        return float(np.mean([len(b) * lengths[b].max() for b in timed]))


def run_hpc_kd(setup: Setup, device: str, deepspeed: bool) -> tuple[float, float | None]:
    from dataclasses import replace

    from hpc_kd import distributed
    from hpc_kd.config import DeepSpeedConfig
    from hpc_kd.loop import Trainer
    from hpc_kd.step import Task
    from hpc_kd.rundir import RunDir

    args = setup.args
    run = RunDir(Path(tempfile.mkdtemp(prefix="hpc_kd_bench_ft_")))
    _peak_reset(device)
    if deepspeed:
        from hpc_kd.engine import EngineTrainer

        cfg = replace(setup.train_cfg, deepspeed=DeepSpeedConfig(zero_stage=args.zero, precision=args.precision))
        with distributed.session(distributed.World(), device):
            trainer = EngineTrainer(distributed.for_this_rank(run), setup.model(), setup.tokenizer, setup.dataset,
                                    Task(), cfg, 0, device=device)
            seconds = _time_steps(trainer, setup.batches, args.warmup, device)
    else:
        trainer = Trainer(run, setup.model(), setup.tokenizer, setup.dataset, Task(), setup.train_cfg, 0, device=device)
        seconds = _time_steps(trainer, setup.batches, args.warmup, device)
    peak = _peak(device)
    del trainer
    return seconds / args.steps, peak


def _time_steps(trainer, batches, warmup: int, device: str) -> float:
    for index in batches[:warmup]:
        trainer._train_step(index)
    _sync(device)
    start = time.perf_counter()
    for index in batches[warmup:]:
        trainer._train_step(index)
    _sync(device)
    return time.perf_counter() - start


class _Examples(torch.utils.data.Dataset):
    def __init__(self, encoded, order: np.ndarray):
        self.encoded, self.order = encoded, order

    def __len__(self):
        return len(self.order)

    def __getitem__(self, i):
        j = int(self.order[i])
        tokens = self.encoded.tokens[j]
        return {"input_ids": tokens.tolist(), "attention_mask": [1] * len(tokens), "labels": int(self.encoded.labels[j])}


def run_hf(setup: Setup, device: str, same_batches: bool) -> tuple[float, float | None, float]:
    """Seconds per timed step, peak GiB, padded tokens per timed step of the HF ``Trainer``."""
    from transformers import DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments

    args = setup.args
    encoded = setup.dataset.encoded["train"]
    if same_batches:  # hpc_kd's batches, laid out one after the other, read in order
        order = np.concatenate(setup.batches)
    else:
        order = np.arange(len(encoded))
    widths: list[int] = []
    pad = DataCollatorWithPadding(setup.tokenizer)

    def collate(features):
        batch = pad(features)
        widths.append(batch["input_ids"].numel())
        return batch

    marks: dict[str, float] = {}

    class Clock(TrainerCallback):
        def on_step_end(self, targs, state, control, **kw):
            if state.global_step == args.warmup:
                _sync(device)
                marks["start"] = time.perf_counter()
            if state.global_step == args.warmup + args.steps:
                _sync(device)
                marks["end"] = time.perf_counter()
                control.should_training_stop = True

    class Sequential(Trainer):
        def _get_train_sampler(self, *a, **k):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    cfg = setup.train_cfg
    targs = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="hpc_kd_bench_hf_"), per_device_train_batch_size=args.batch_size,
        learning_rate=cfg.lr, weight_decay=cfg.weight_decay, warmup_steps=int(cfg.warmup_ratio * len(setup.batches)),
        max_grad_norm=cfg.max_grad_norm, lr_scheduler_type="linear", optim="adamw_torch_fused",  # hpc_kd.loop.adamw is fused too
        max_steps=args.warmup + args.steps, num_train_epochs=1, seed=0, data_seed=0,
        bf16=args.precision == "bf16", fp16=args.precision == "fp16", use_cpu=not device.startswith("cuda"),
        save_strategy="no", eval_strategy="no", logging_strategy="no", report_to=[], disable_tqdm=True,
        dataloader_num_workers=0, remove_unused_columns=False)
    _peak_reset(device)
    trainer = (Sequential if same_batches else Trainer)(
        model=setup.model(), args=targs, train_dataset=_Examples(encoded, order), data_collator=collate,
        callbacks=[Clock()])
    trainer.train()
    peak = _peak(device)
    if same_batches:  # the HF Trainer saw exactly hpc_kd's padded batches
        lengths = encoded.lengths
        expected = [len(b) * int(lengths[b].max()) for b in setup.batches]
        if widths[: len(expected)] != expected:
            raise SystemExit("the HF Trainer's batches differ from hpc_kd's: the comparison would not be like for like")
    tokens = float(np.mean(widths[args.warmup: args.warmup + args.steps]))
    del trainer
    return (marks["end"] - marks["start"]) / args.steps, peak, tokens


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    ap.add_argument("--pretrained", default="embedded", help="embedded, a hub name (cluster) or a local folder")
    ap.add_argument("--source", default="embedded", choices=("embedded", "hf"))
    ap.add_argument("--dataset", default="glue/sst2", help="for --source hf")
    ap.add_argument("--text-column", default="sentence", help="for --source hf")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--zero", type=int, default=0, choices=(0, 1, 2, 3))
    ap.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: all cores)")
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    modes = [m for m in MODES if not (m == "hpc_kd loop" and args.precision != "fp32")]  # the loop is fp32 only
    if args.worker is not None:
        return worker(args, device, modes[args.worker])
    times = {m: [] for m in modes}
    peaks = {m: [] for m in modes}
    tokens = {}
    for _ in range(args.rounds):  # every measurement in a fresh process: no state carries over
        for i, mode in enumerate(modes):
            cmd = [sys.executable, __file__, *(sys.argv[1:] if argv is None else argv), "--worker", str(i)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
            if out.returncode != 0 or not lines:
                raise SystemExit(f"{mode} failed:\n{(out.stdout + out.stderr)[-4000:]}")
            result = json.loads(lines[-1][len("RESULT "):])
            times[mode].append(result["s_per_step"])
            peaks[mode].append(result["peak_gib"])
            tokens[mode] = result["tokens_per_step"]
    where = torch.cuda.get_device_name() if device == "cuda" else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    import transformers

    print(f"# {where}, load {load:.1f}; torch {torch.__version__}, transformers {transformers.__version__}; "
          f"{args.pretrained}, max_length {args.max_length}, batch {args.batch_size}, {args.precision}, "
          f"ZeRO-{args.zero} (DeepSpeed mode); {args.steps} timed steps after {args.warmup}, median of {args.rounds} rounds")
    print("| mode | s/step | examples/s | padded tokens/step | peak GiB |")
    print("|---|---|---|---|---|")
    med = {m: statistics.median(times[m]) for m in modes}
    for m in modes:
        peak = "-" if peaks[m][0] is None else f"{max(peaks[m]):.2f}"
        print(f"| {m} | {med[m]:.4f} | {args.batch_size / med[m]:.1f} | {tokens[m]:.0f} | {peak} |")
    ref = med["HF Trainer, same batches"]
    for m in modes:
        if m.startswith("hpc_kd"):
            print(f"throughput ratio, {m} / HF Trainer (same batches): {ref / med[m]:.3f}")
    print(f"throughput ratio, HF Trainer same batches / HF Trainer default: {med['HF Trainer, default'] / ref:.3f}")
    return med


def worker(args, device: str, mode: str) -> None:
    """One measurement of one mode; prints a RESULT line as JSON."""
    setup = Setup(args)
    if mode.startswith("hpc_kd"):
        seconds, peak = run_hpc_kd(setup, device, deepspeed=mode.endswith("DeepSpeed"))
        tokens = setup.padded_tokens(setup.batches)
    else:
        seconds, peak, tokens = run_hf(setup, device, same_batches=mode.endswith("same batches"))
    print("RESULT " + json.dumps({"s_per_step": seconds, "peak_gib": peak, "tokens_per_step": tokens}), flush=True)


if __name__ == "__main__":
    main()
