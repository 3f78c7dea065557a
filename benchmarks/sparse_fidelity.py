"""Benchmark: how faithful sparse teacher targets are to the dense ones, on the embedded SmolLM2
teacher and real review text, to choose a language model's cache default (issue 11).

    python benchmarks/sparse_fidelity.py [--tokens 2048] [--ks 8 32 64 128] [--student-layers 15] [--precisions float16 log8]

For each stored size k (and each cache precision, ``--precisions``: the top-k targets as a
float16 or log8 cache gives them back) it measures, side by side over the same tokens:
- the teacher's probability mass inside its top k (mean and worst token);
- against a student (the teacher cut to ``--student-layers`` uniform layers: a realistic
  distance, before any training), the forward-KL distillation loss and its gradient with respect
  to the student's logits, from: top-k with the tail bin (hpc_kd's top_k), top-k renormalised
  (the tail dropped, the common shortcut), and k sampled draws (hpc_kd's sampled; its mean over
  ``--draws`` repetitions is also shown, to see the bias apart from the noise).
Printed: each estimate's loss relative to the dense loss, and the cosine between its gradient
and the dense gradient (1 is perfect), mean over tokens. Ratios, not times: no machine noise.
``--pretrained`` takes any causal LM folder (the tests pass a tiny one).
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hpc_kd.config import DataConfig  # noqa: E402
from hpc_kd.data import Dataset  # noqa: E402
from hpc_kd.models import load_pretrained, load_tokenizer, shrink  # noqa: E402
from hpc_kd.sparse import SparseTargets, divergence, sampled, stored, top_k  # noqa: E402


def token_logits(model, encoded, n_tokens: int) -> tuple[torch.Tensor, list[int]]:
    """Logits [n, V] of the first ``n_tokens`` predicted tokens of the split (sequence by sequence)."""
    rows, taken, used = [], 0, []
    with torch.no_grad():
        for i in range(len(encoded)):
            batch = encoded.collate([i])
            z = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[0, :-1].float()
            rows.append(z)
            used.append(i)
            taken += len(z)
            if taken >= n_tokens:
                break
    return torch.cat(rows)[:n_tokens], used


def loss_and_grad(z_s: torch.Tensor, make) -> tuple[torch.Tensor, torch.Tensor]:
    z = z_s.clone().requires_grad_(True)
    value = make(z)
    value.sum().backward()
    return value.detach(), z.grad


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrained", default="embedded")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--ks", type=int, nargs="+", default=[8, 32, 64, 128])
    parser.add_argument("--student-layers", type=int, default=15)
    parser.add_argument("--draws", type=int, default=8, help="repetitions of the sampled targets")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--precisions", nargs="*", default=["float16", "log8"],
                        help="cache precisions (distill.sparse_precision) whose stored top-k targets are also measured")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    teacher = load_pretrained(args.pretrained, 2, 0, lm=True).eval()
    tok = load_tokenizer(args.pretrained, lm=True)
    data = Dataset.build(DataConfig(task="causal_lm", name="imdb", max_length=256, max_eval_examples=64), tok)
    encoded = data.encoded["validation"]
    student = shrink(teacher, args.student_layers, "uniform", 0).eval()
    z_t, _ = token_logits(teacher, encoded, args.tokens)
    z_s, _ = token_logits(student, encoded, args.tokens)
    print(f"teacher: {args.pretrained} ({teacher.config.num_hidden_layers} layers, vocabulary {z_t.shape[1]}); "
          f"student: its {args.student_layers} uniform layers, untrained; {len(z_t)} review tokens (IMDB validation)")
    dense_loss, dense_grad = loss_and_grad(z_s, lambda z: (F.softmax(z_t, -1) * (F.log_softmax(z_t, -1) - F.log_softmax(z, -1))).sum(-1))
    p_t = F.softmax(z_t, -1)

    def row(name, k, loss, grad):
        cos = F.cosine_similarity(grad, dense_grad, dim=-1)
        print(f"| {name} | {k} | {float((loss.mean() / dense_loss.mean())):.3f} | {float(cos.mean()):.4f} | {float(cos.min()):.4f} |")

    print("\n| k | mean top-k mass | worst token |\n|---|---|---|")
    for k in args.ks:
        mass = p_t.topk(k, -1).values.sum(-1)
        print(f"| {k} | {float(mass.mean()):.3f} | {float(mass.min()):.3f} |")
    print("\n| targets | k | loss / dense loss | gradient cosine to dense (mean) | (worst token) |\n|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    for k in args.ks:
        t = top_k(z_t, k)
        row("top-k + tail", k, *loss_and_grad(z_s, lambda z, t=t: divergence("kl", z, t)))
        for precision in args.precisions:  # as a cache of that precision gives them back
            q = stored(t, precision)
            row(f"top-k + tail, {precision}", k, *loss_and_grad(z_s, lambda z, q=q: divergence("kl", z, q)))
        renorm = SparseTargets(t.ids, t.log_probs - torch.logsumexp(t.log_probs, -1, keepdim=True),
                               torch.full_like(t.tail, -torch.inf))
        row("top-k renormalised", k, *loss_and_grad(z_s, lambda z, r=renorm: divergence("kl", z, r)))
        losses, grads = [], []
        for _ in range(args.draws):
            s = sampled(z_t, k, generator=gen)
            loss, grad = loss_and_grad(z_s, lambda z, s=s: divergence("kl", z, s))
            losses.append(loss)
            grads.append(grad)
        row("sampled (one draw set)", k, losses[0], grads[0])
        row(f"sampled (mean of {args.draws})", k, torch.stack(losses).mean(0), torch.stack(grads).mean(0))
    print("\nloss / dense: below 1 is what coarse-graining loses (top-k + tail is a lower bound); the gradient"
          " cosine is what training sees.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
