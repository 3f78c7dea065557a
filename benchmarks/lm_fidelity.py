"""Benchmark: does a student trained from a sparse teacher cache end where one trained from the
dense teacher ends? (issue 19)

    python benchmarks/lm_fidelity.py [--student-layers 4] [--train 320] [--epochs 2] [--batch-size 8]
        [--max-length 32] [--k 64] [--lr 3e-4] [--alpha 1.0] [--device cpu|cuda] [--dtype fp32|bf16]

One student (``--student-layers`` uniform layers of the teacher, the embedded SmolLM2-135M-Instruct
by default), one seed and the same batches, trained the same number of steps with plain KD
(``--alpha`` 1: the teacher term alone, so that nothing dilutes the difference) from
(a) the live dense teacher (its full 49,152-token distribution at every step),
(b) a top-k + tail cache in float32 (``distill.sparse_precision: float32``, the layout's old default),
(c) the compact default cache (``log8``).
Printed: each student's validation token NLL (and its top-1 agreement with the teacher), the
ratios (b)/(a) and (c)/(a) (goal: within 1%), and where the NLL started and the uniform guess.

The student's input embeddings (tied to its output layer in SmolLM2) are frozen by default
(``--train-embeddings`` trains them): its transformer layers learn, and a step on CPU costs
two thirds of one with the 28 M-parameter vocabulary matrix updated. Both caches are written
by the cache's own writer; the log8 one re-encodes the float32 one's targets (what a second
teacher pass would write, without its cost).
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lm_common as lm  # noqa: E402

from hpc_kd.config import TrainConfig  # noqa: E402
from hpc_kd.loop import Trainer, evaluate  # noqa: E402
from hpc_kd.models import shrink  # noqa: E402
from hpc_kd.rundir import RunDir  # noqa: E402
from hpc_kd.sources import CachedLogits, FrozenModel  # noqa: E402
from hpc_kd.step import Task  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="embedded", help="a causal LM: embedded (SmolLM2-135M-Instruct) or a folder")
    ap.add_argument("--student-layers", type=int, default=4)
    ap.add_argument("--init", default="uniform", choices=("uniform", "first"))
    ap.add_argument("--train", type=int, default=320, help="training sequences")
    ap.add_argument("--eval", type=int, default=64, help="validation sequences")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=32)
    ap.add_argument("--k", type=int, default=64, help="top-k entries a cache keeps (distill.sparse_k)")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--alpha", type=float, default=1.0, help="weight of the teacher term (1 - alpha: gold CE)")
    ap.add_argument("--train-embeddings", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    lm.add_device_args(ap)
    args = ap.parse_args(argv)
    device = lm.device_of(args)
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="hpc_kd_lm_fidelity_"))
    teacher, tok, vocab = lm.load_teacher(args.teacher, device)
    data_cfg, dataset = lm.lm_dataset(tok, args.max_length, args.train, args.eval)
    train, val = dataset.encoded["train"], dataset.encoded["validation"]
    amp = lambda: lm.autocast(device, args.dtype)  # noqa: E731

    f32 = lm.sparse_spec(args.k, "float32")
    log8 = lm.sparse_spec(args.k, "log8")
    write_s, cache_f32 = lm.write_sparse(tmp / "float32", teacher, data_cfg, dataset, "teacher", f32, vocab, device, args.dtype)
    cache_log8 = lm.reencode(tmp / "float32", tmp / "log8", data_cfg, dataset, "teacher", f32, log8, vocab)

    torch.manual_seed(args.seed)
    student0 = shrink(teacher, args.student_layers, args.init, args.seed)
    if not args.train_embeddings:
        student0.get_input_embeddings().weight.requires_grad_(False)
    cfg = TrainConfig(lr=args.lr, batch_size=args.batch_size, eval_batch_size=32, epochs=args.epochs, warmup_ratio=0.1)
    with amp():
        start_nll = evaluate(student0.to(device), val, 32, 2, device)["token_nll"]
        teacher_nll = evaluate(teacher, val, 32, 2, device)["token_nll"]
    modes = {
        "a": ("dense teacher, live", lambda: FrozenModel(teacher)),
        "b": (f"top-{args.k} + tail cache, float32", lambda: CachedLogits(cache_f32, device)),
        "c": (f"top-{args.k} + tail cache, log8 (default)", lambda: CachedLogits(cache_log8, device)),
    }
    out, n_steps = {}, 0
    for key, (label, source) in modes.items():
        trainer = Trainer(RunDir(tmp / f"run_{key}"), copy.deepcopy(student0), tok, dataset,
                          Task(source(), tau=1.0, alpha=args.alpha), cfg, seed=args.seed, device=device)
        lm.sync(device)
        t0 = time.perf_counter()
        with amp():
            for epoch in range(args.epochs):
                for index in trainer._batches(epoch):
                    trainer._train_step(index)
                    trainer.p.step += 1  # as the loop counts (the tutor's schedule and the policies read it)
            lm.sync(device)
            seconds = time.perf_counter() - t0
            metrics = evaluate(trainer.student.model, val, 32, 2, device, reference=teacher)
        n_steps = trainer.p.step
        out[key] = (label, metrics["token_nll"], metrics["teacher_agreement"], seconds / n_steps)
        print(f"({key}) {label}: validation token NLL {metrics['token_nll']:.4f} after {n_steps} steps", flush=True)
        del trainer

    print(f"\n# {lm.machine(device)}; {args.dtype}")
    print(f"# teacher {args.teacher} ({teacher.config.num_hidden_layers} layers, vocabulary {vocab}); student: its "
          f"{args.student_layers} {args.init} layers{'' if args.train_embeddings else ', embeddings frozen'}; "
          f"{len(train)} training sequences ({lm.tokens_of(train)} predicted tokens) cut at {args.max_length} tokens, "
          f"batch {args.batch_size}, {args.epochs} epochs = {n_steps} steps, lr {args.lr}, alpha {args.alpha}, tau 1, "
          f"seed {args.seed}; validation: {len(val)} sequences ({lm.tokens_of(val)} tokens)")
    print(f"# validation token NLL: uniform guess ln({vocab}) = {math.log(vocab):.2f}; the student before training "
          f"{start_nll:.3f}; the teacher {teacher_nll:.3f}")
    print(f"# caches: float32 {lm.cache_bytes(cache_f32) / lm.tokens_of(train):.1f} bytes/token, "
          f"log8 {lm.cache_bytes(cache_log8) / lm.tokens_of(train):.1f} bytes/token (teacher pass and write {write_s:.1f} s)")
    print("| targets | validation token NLL | ratio to (a) | top-1 agreement with teacher | s/step |")
    print("|---|---|---|---|---|")
    ref = out["a"][1]
    for key, (label, nll, agree, s) in out.items():
        print(f"| ({key}) {label} | {nll:.4f} | {nll / ref:.4f} | {agree:.3f} | {s:.3f} |")
    for key in ("b", "c"):
        gap = out[key][1] / ref - 1
        print(f"({key})/(a) - 1 = {100 * gap:+.2f}%: {'within' if abs(gap) <= 0.01 else 'NOT within'} 1% of the dense teacher")
    print(f"# total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
