"""Benchmark: bytes per token of a language model's sparse logit cache, per layout and precision
(issue 19), on the embedded SmolLM2 teacher and the LM demo's training reviews.

    python benchmarks/cache_size.py [--ks 64 128] [--examples 256] [--max-length 64]

It runs the teacher once over the reviews (``jobs/lm_demo.yaml``'s training split: 256 reviews cut
at 64 tokens), takes its top-k targets, and writes them as the cache writer does
(:func:`hpc_kd.cache.sparse_table`, :data:`hpc_kd.cache.SPARSE_PARQUET`) at each precision, beside
the layout before issue 19 (a row per token with its int64 example id, int32 position, int32 ids,
float32 log-probabilities and tail; Snappy). Printed: bytes on disk per token, and what a dense
float32 row of the vocabulary would take (4 bytes a token id, not written). The teacher is the
pretrained one, not the demo's fine-tuned one, so the figures differ from a demo cache's by its
distribution only. ``--pretrained`` takes any causal LM folder (the tests pass a tiny one).
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hpc_kd.cache import SPARSE_PARQUET, sparse_table  # noqa: E402
from hpc_kd.config import DataConfig  # noqa: E402
from hpc_kd.data import Dataset, eval_batches  # noqa: E402
from hpc_kd.models import load_pretrained, load_tokenizer  # noqa: E402
from hpc_kd.sparse import PRECISIONS, SparseTargets, top_k  # noqa: E402


def old_layout(example: np.ndarray, t: SparseTargets) -> pa.Table:
    k = t.ids.shape[1]
    position = np.concatenate([np.arange(c, dtype=np.int32) for c in np.unique(example, return_counts=True)[1]])
    return pa.Table.from_arrays([
        pa.array(example, type=pa.int64()), pa.array(position, type=pa.int32()),
        pa.FixedSizeListArray.from_arrays(pa.array(t.ids.numpy().astype(np.int32).reshape(-1)), k),
        pa.FixedSizeListArray.from_arrays(pa.array(t.log_probs.numpy().reshape(-1)), k), pa.array(t.tail.numpy())],
        names=["example_id", "position", "ids", "log_probs", "tail"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrained", default="embedded")
    parser.add_argument("--ks", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_pretrained(args.pretrained, 2, 0, lm=True).eval()
    tok = load_tokenizer(args.pretrained, lm=True)
    data = Dataset.build(DataConfig(task="causal_lm", name="movie_reviews", max_length=args.max_length,
                                    max_train_examples=args.examples), tok)
    train = data.encoded["train"]
    order = np.argsort(train.ids, kind="stable")
    lengths = np.array([len(train.tokens[r]) for r in order])
    vocab = model.get_output_embeddings().out_features
    per_seq = {k: {} for k in args.ks}
    with torch.no_grad():
        for local in eval_batches(lengths, 16):
            batch = train.collate(order[local])
            z = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
            for k in args.ks:
                t = top_k(z, k)
                for j, i in enumerate(local):
                    n = lengths[i] - 1
                    per_seq[k][i] = (t.ids[j, :n], t.log_probs[j, :n], t.tail[j, :n])
    example = np.repeat(train.ids[order], lengths - 1)
    tokens = len(example)
    print(f"teacher: {args.pretrained} (vocabulary {vocab}); {len(order)} training reviews cut at {args.max_length} "
          f"tokens: {tokens} token rows\n")
    print("| layout | k | bytes on disk | bytes per token |\n|---|---|---|---|")
    print(f"| dense float32 (a row of the vocabulary, not written) | {vocab} | {tokens * vocab * 4} | {vocab * 4} |")
    with tempfile.TemporaryDirectory() as tmp:
        for k in args.ks:
            t = SparseTargets(*(torch.cat([per_seq[k][i][c] for i in range(len(order))]) for c in range(3)))
            tables = {"before issue 19 (float32, Snappy)": (old_layout(example, t), {})}
            for precision in PRECISIONS:
                tables[f"compact, {precision}"] = (sparse_table(example, t, precision, vocab), SPARSE_PARQUET)
            for name, (table, options) in tables.items():
                path = Path(tmp) / "shard.parquet"
                pq.write_table(table, path, **options)
                size = path.stat().st_size
                print(f"| {name} | {k} | {size} | {size / tokens:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
