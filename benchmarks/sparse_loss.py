"""What the sparse KD term costs against the cross-entropy on the same logits, and two other ways
of computing it that were tried (issue 19), side by side.

    python benchmarks/sparse_loss.py [--batch 8] [--length 32] [--vocab 49152] [--k 64] [--rounds 7] [--threads 2]

Times forward + backward on one batch of student logits (random, float32; the sizes of the LM
speed benchmark and the embedded SmolLM2 vocabulary), modes interleaved round-robin, medians:
(i) the next-token cross-entropy (fused log-softmax + NLL); (ii) the forward KL against top-k
sparse targets as hpc_kd computes it (:func:`hpc_kd.sparse.divergence`, i.e.
:func:`hpc_kd.sparse.forward_kl`: its gradient written by hand); (iii) the same through
:func:`hpc_kd.sparse.on_support` and autograd (a log-softmax, the rest of the mass by a masked
logsumexp: how every other divergence is computed, and the KL was until issue 19); (iv) from the
logits and their logsumexp, the rest by a min-scatter of -inf on the target ids; (v) the same with
a plain scatter; then a language model's whole default loss at α = 0.5, (vi) the KL and the
cross-entropy computed apart (as hpc_kd did before issue 19's fused loss) and (vii) in one function,
:func:`hpc_kd.sparse.kd_loss` (the passes over the vocabulary shared). Also prints the largest
difference between (ii) and (iii)–(v), and between (vi) and (vii), in loss and gradient: they
compute the same numbers.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hpc_kd import sparse  # noqa: E402
from hpc_kd.divergences import DIVERGENCES  # noqa: E402


def _from_logits(z, targets, rest):
    total = torch.logsumexp(z, dim=-1)
    picked = z.gather(-1, targets.ids) - total.unsqueeze(-1)
    picked = torch.where(targets.valid, picked, torch.full_like(picked, -torch.inf))
    return torch.cat([picked, (rest(z, targets) - total).unsqueeze(-1)], dim=-1)


def min_scatter_rest(z, targets):
    drop = torch.where(targets.valid, torch.full(targets.ids.shape, -torch.inf), torch.full(targets.ids.shape, torch.inf))
    return torch.logsumexp(z.scatter_reduce(-1, targets.ids, drop, reduce="amin", include_self=True), dim=-1)


def scatter_rest(z, targets):  # padding entries point at the row's first valid id (a repeat is harmless)
    first = targets.valid.to(torch.int8).argmax(-1, keepdim=True)
    ids = torch.where(targets.valid, targets.ids, targets.ids.gather(-1, first))
    return torch.logsumexp(z.scatter(-1, ids, -torch.inf), dim=-1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    shape = (args.batch * args.length, args.vocab)
    student = torch.randn(shape, generator=gen) * 2
    targets = sparse.top_k(torch.randn(shape, generator=gen) * 3, args.k)
    labels = torch.randint(0, args.vocab, (shape[0],), generator=gen)

    def ce(z):
        return F.cross_entropy(z, labels)

    def current(z):
        return sparse.divergence("kl", z, targets).mean()

    def autograd(z):
        return DIVERGENCES["kl"](sparse.on_support(z, targets), targets.bins()).mean()

    def min_scatter(z):
        return DIVERGENCES["kl"](_from_logits(z, targets, min_scatter_rest), targets.bins()).mean()

    def plain_scatter(z):
        return DIVERGENCES["kl"](_from_logits(z, targets, scatter_rest), targets.bins()).mean()

    def apart(z):
        return 0.5 * sparse.divergence("kl", z, targets).mean() + 0.5 * ce(z)

    def fused(z):
        return sparse.kd_loss(z, targets, labels, 1.0, 0.5).mean()

    modes = {"(i) cross-entropy": ce, "(ii) sparse KL (hpc_kd)": current, "(iii) sparse KL, autograd": autograd,
             "(iv) sparse KL, logsumexp + min-scatter": min_scatter, "(v) sparse KL, logsumexp + scatter": plain_scatter,
             "(vi) α KL + (1 − α) CE, apart": apart, "(vii) α KL + (1 − α) CE, fused (hpc_kd)": fused}
    grads, values, times = {}, {}, {name: [] for name in modes}
    for r in range(args.rounds + 1):  # the first round warms up
        for name, fn in modes.items():
            z = student.clone().requires_grad_(True)
            t0 = time.perf_counter()
            loss = fn(z)
            loss.backward()
            elapsed = time.perf_counter() - t0
            if r:
                times[name].append(elapsed)
            values[name], grads[name] = loss.item(), z.grad
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"# {args.batch} x {args.length} positions, vocabulary {args.vocab}, top-{args.k} targets, "
          f"{args.threads} threads, {args.rounds} rounds (median), forward + backward")
    print("| mode | ms | ratio to (i) |")
    print("|---|---|---|")
    for name, t in med.items():
        print(f"| {name} | {1000 * t:.1f} | {t / med['(i) cross-entropy']:.2f} |")
    a = "(ii) sparse KL (hpc_kd)"
    print(f"sparse KL / cross-entropy = {med[a] / med['(i) cross-entropy']:.2f}")
    for b in list(modes)[2:5]:
        print(f"{b.split()[0]} against (ii): {med[b] / med[a]:.2f}x the time; loss |Δ| = {abs(values[a] - values[b]):.2e}, "
              f"gradient max |Δ| = {(grads[a] - grads[b]).abs().max().item():.2e}")
    a, b = "(vi) α KL + (1 − α) CE, apart", "(vii) α KL + (1 − α) CE, fused (hpc_kd)"
    print(f"the whole loss: fused / cross-entropy = {med[b] / med['(i) cross-entropy']:.2f}, apart / cross-entropy = "
          f"{med[a] / med['(i) cross-entropy']:.2f}; (vii) against (vi): {med[b] / med[a]:.2f}x the time; "
          f"loss |Δ| = {abs(values[a] - values[b]):.2e}, gradient max |Δ| = {(grads[a] - grads[b]).abs().max().item():.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
