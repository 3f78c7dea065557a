"""Benchmark: how often does a teacher-vs-tutor decision made on sparse targets equal the decision
the dense distributions make? (issue 19, item 5)

    python benchmarks/sparse_decisions.py [--teacher embedded] [--pairs 24:28,20:28,20:24,15:28,15:24,15:20]
        [--sequences 64] [--batch-size 8] [--max-length 32] [--k 8,64,128] [--tau 1.0]

TEID's ``min_loss`` policy gives a batch to the source toward which the student's distillation
loss is lower (``min_loss_sample``: each sequence). With a language model's teacher in a sparse
cache, the live tutor is put on the teacher's support (its top-k entries plus a tail bin) and
rounded as the cache rounded (``hpc_kd.step._on_support``): like with like in support, not in
accuracy, for on the bins alone the student's and the tutor's disagreement inside the teacher's
tail is invisible. Under the forward KL, ``hpc_kd`` now adds to both losses what the bins miss,
``α τ² p(tail) KL(u_rest ‖ s_rest)`` (``hpc_kd.sparse.tail_kl``, ``hpc_kd.step._decision_losses``).
This measures how often each comparison makes the decision the dense distributions make.

Models: the teacher (the embedded SmolLM2-135M-Instruct, 30 layers, by default) and students and
tutors made of its uniform layers (``--pairs student:tutor`` depths), untrained: the pairs give
close and clear decisions alike (the dense teacher share per pair is printed). Sequences: the
movie reviews of the LM demo's corpus (validation split), cut at ``--max-length`` tokens. Only the
distillation terms are compared (``alpha`` 1: the gold cross-entropy is the same on both sides).

Per k, the comparisons (the same student logits throughout):

- ``top_k`` log8 with the tail divergence: what ``hpc_kd`` hands the policy, through its own
  ``step._losses``;
- ``top_k`` on the bins only, with the cache's three precisions (float32, float16, log8): what
  ``hpc_kd`` compared before;
- ``top_k`` log8, bins only for the teacher, the tutor's own dense loss (unlike with unlike);
- ``top_k`` log8 on the bins of the **union** of the teacher's top k and the live tutor's top k:
  the teacher's mass on the tutor's extra ids estimated from its tail, shared in proportion to the
  tutor's probabilities there (the cache does not hold the teacher's values outside its top k);
- ``sampled``: k draws from the teacher, the tutor on the drawn ids (the plan refuses a tutor with
  sampled targets; shown for why).

Printed per variant: agreement with the dense decisions per sequence and per batch, the same on
the closer half of the sequence decisions (relative dense margin below its median), the share of
decisions that go to the teacher, and the mean shift of the margin ``L_T − L_U`` in nats (positive:
the sparse comparison favours the tutor more than the dense one does).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lm_common as lm  # noqa: E402

from hpc_kd import losses, sparse  # noqa: E402
from hpc_kd.models import shrink  # noqa: E402
from hpc_kd.sources import forward  # noqa: E402
from hpc_kd.step import Micro, Task, _losses  # noqa: E402


def union_support(t: sparse.SparseTargets, z_u: torch.Tensor, k: int, tau: float) -> sparse.SparseTargets:
    """The teacher's targets ``t`` widened to the union of its ids and the tutor's top ``k``
    (logits ``z_u``, the same positions): on a tutor id outside ``t``, the teacher's probability is
    estimated as its tail mass times the tutor's share of that id among the tutor's mass outside
    ``t``'s ids; the teacher's tail keeps the rest. Duplicates are padding (-inf)."""
    log_u = F.log_softmax(z_u.float() / tau, dim=-1)
    ids_u = log_u.topk(k, dim=-1).indices
    dup = (ids_u.unsqueeze(-1) == t.ids.unsqueeze(-2)).any(-1)
    rest_u = sparse._rest(log_u, t.ids, t.valid)  # the tutor's mass outside the teacher's ids
    picked = log_u.gather(-1, ids_u).masked_fill(dup, -torch.inf)
    estimate = t.tail.unsqueeze(-1) + picked - rest_u.unsqueeze(-1)
    share = torch.logsumexp(picked, dim=-1) - rest_u  # the extra ids' share of the tutor's rest (log)
    tail = t.tail + torch.log1p(-share.exp().clamp(max=1 - 1e-6))
    return sparse.SparseTargets(torch.cat([t.ids, ids_u], -1), torch.cat([t.log_probs, estimate], -1), tail)


def soft(z_s: torch.Tensor, targets, y: torch.Tensor, tau: float) -> torch.Tensor:
    """The per-sequence distillation term (alpha 1) toward dense logits or sparse targets."""
    return losses.distillation_loss(z_s, targets, y, tau, 1.0)


def variants(ks: list[int]) -> list[tuple[str, int]]:
    out = []
    for k in ks:
        out += [(f"top-{k} log8 + tail divergence (hpc_kd's decision)", k),
                (f"top-{k} float32, bins only", k), (f"top-{k} float16, bins only", k), (f"top-{k} log8, bins only", k),
                (f"top-{k} log8, bins only, tutor dense (unprojected)", k),
                (f"top-{k} log8, bins only, union with the tutor's top-{k}", k),
                (f"sampled {k} draws, tutor on the draws", k)]
    return out


def margins(name: str, k: int, z_s, z_t, z_u, batch: dict, tau: float, gen: torch.Generator) -> torch.Tensor:
    """``L_T − L_U`` per sequence under ``name``'s targets."""
    zt, zu, y = z_t[:, :-1], z_u[:, :-1], batch["labels"]
    if name.startswith("sampled"):
        t = sparse.sampled(zt, k, tau, generator=gen)
        return soft(z_s, t, y, tau) - soft(z_s, sparse.project(zu, t, tau), y, tau)
    precision = next(p for p in sparse.PRECISIONS if p in name)
    t = sparse.stored(sparse.top_k(zt, k, tau), precision)
    if "hpc_kd" in name:  # what the step hands the policy (hpc_kd.step._losses)
        o = _losses(Task(None, None, None, tau=tau, alpha=1.0, term="kl"),
                    {"m": Micro(batch, torch.ones(len(z_s)), 0, len(z_s)), "z_s": z_s, "z_t": t, "z_u": z_u})
        return o["sel_t"] - o["sel_u"]
    if "unprojected" in name:
        return soft(z_s, t, y, tau) - soft(z_s, z_u, y, tau)
    if "union" in name:
        t = sparse.stored(union_support(t, zu, k, tau), precision)
    return soft(z_s, t, y, tau) - soft(z_s, sparse.stored(sparse.project(zu, t, tau), precision), y, tau)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="embedded", help="a causal LM: embedded (SmolLM2-135M-Instruct) or a folder")
    ap.add_argument("--pairs", default="24:28,20:28,20:24,15:28,15:24,15:20",
                    help="student:tutor depths (uniform layers of the teacher), comma-separated")
    ap.add_argument("--sequences", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=32)
    ap.add_argument("--k", default="8,64,128", help="entries per token, comma-separated")
    ap.add_argument("--tau", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    lm.add_device_args(ap)
    args = ap.parse_args(argv)
    device = lm.device_of(args)
    started = time.perf_counter()
    teacher, tok, vocab = lm.load_teacher(args.teacher, device)
    pairs = [tuple(int(x) for x in p.split(":")) for p in args.pairs.split(",")]
    ks = [int(k) for k in args.k.split(",")]
    depths = sorted({d for p in pairs for d in p})
    models = {d: shrink(teacher, d, "uniform", args.seed).eval().to(device) for d in depths}
    _, dataset = lm.lm_dataset(tok, args.max_length, args.batch_size, args.sequences)
    val = dataset.encoded["validation"]
    gen = torch.Generator().manual_seed(args.seed)
    names = variants(ks)
    dense: dict = {p: [] for p in pairs}
    shifted: dict = {(p, n): [] for p in pairs for n, _ in names}
    for start in range(0, len(val), args.batch_size):
        batch = {key: v.to(device) for key, v in val.collate(np.arange(start, min(start + args.batch_size, len(val)))).items()}
        y = batch["labels"]
        with torch.no_grad(), lm.autocast(device, args.dtype):
            z_t = forward(teacher, batch).float()
            z = {d: forward(m, batch).float() for d, m in models.items()}
            for s, u in pairs:
                dense[(s, u)].append(soft(z[s], z_t, y, args.tau) - soft(z[s], z[u], y, args.tau))
                for name, k in names:
                    shifted[((s, u), name)].append(margins(name, k, z[s], z_t, z[u], batch, args.tau, gen))
        print(f"batch {start // args.batch_size + 1} of {math.ceil(len(val) / args.batch_size)}", file=sys.stderr, flush=True)

    d_seq = torch.cat([torch.cat(dense[p]) for p in pairs]).cpu()
    d_batch = torch.stack([m.mean() for p in pairs for m in dense[p]]).cpu()
    close = d_seq.abs() <= d_seq.abs().median()  # the closer half of the sequence decisions
    print(f"\n# {lm.machine(device)}; {args.dtype}")
    print(f"# teacher {args.teacher} ({teacher.config.num_hidden_layers} layers, vocabulary {vocab}); "
          f"student:tutor depths {args.pairs} (uniform layers, untrained); {len(val)} sequences cut at "
          f"{args.max_length} tokens ({lm.tokens_of(val)} predicted), batches of {args.batch_size}; tau {args.tau}; "
          f"decisions: {len(d_seq)} per sequence, {len(d_batch)} per batch; dense margins L_T - L_U: median |.| "
          f"{d_seq.abs().median():.3f} nats")
    print("# dense teacher share per pair (sequences): " + ", ".join(
        f"{s}:{u} {float((torch.cat(dense[(s, u)]) < 0).float().mean()):.2f}" for s, u in pairs))
    print("| targets | agreement, sequences | agreement, batches | agreement, closer half | teacher share | "
          "dense teacher share | margin shift (nats) |")
    print("|---|---|---|---|---|---|---|")
    for name, _ in names:
        m_seq = torch.cat([torch.cat(shifted[(p, name)]) for p in pairs]).cpu()
        m_batch = torch.stack([m.mean() for p in pairs for m in shifted[(p, name)]]).cpu()
        agree = ((m_seq < 0) == (d_seq < 0)).float()
        print(f"| {name} | {agree.mean():.3f} | {((m_batch < 0) == (d_batch < 0)).float().mean():.3f} | "
              f"{agree[close].mean():.3f} | {(m_seq < 0).float().mean():.3f} | {(d_seq < 0).float().mean():.3f} | "
              f"{(m_seq - d_seq).mean():+.3f} |")
    print(f"# total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
