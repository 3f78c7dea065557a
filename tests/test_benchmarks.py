"""The benchmarks run (tiny model, a few steps): they are not timed here, only kept working."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import process_env

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_sparse_fidelity_runs_on_a_decoder(tiny_decoder):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sparse_fidelity.py"), "--pretrained", str(tiny_decoder),
                          "--tokens", "64", "--ks", "4", "--student-layers", "2", "--draws", "2", "--threads", "1"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT, env=process_env())
    assert out.returncode == 0, out.stderr[-3000:]
    names = [line.split("|")[1].strip() for line in out.stdout.splitlines() if line.startswith("| ") and "| 4 |" in line]
    assert names == ["4", "top-k + tail", "top-k + tail, float16", "top-k + tail, log8", "top-k renormalised",
                     "sampled (one draw set)", "sampled (mean of 2)"]


def test_sparse_decisions_runs_on_a_decoder(tiny_decoder):
    """benchmarks/sparse_decisions.py on the tiny decoder: every comparison's row. (Its random
    models are near uniform, so their decisions are noise: what the comparison does is pinned in
    tests/test_sparse.py, the figures are the embedded teacher's, in benchmarks/README.md.)"""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sparse_decisions.py"), "--teacher", str(tiny_decoder),
                          "--pairs", "2:3,1:2", "--sequences", "8", "--batch-size", "4", "--max-length", "12",
                          "--k", "4", "--threads", "1"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT, env=process_env())
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {line.split("|")[1].strip(): [float(x) for x in line.split("|")[2:-1]]
            for line in out.stdout.splitlines() if line.startswith("| ") and not line.startswith("| targets")}
    assert list(rows) == ["top-4 log8 + tail divergence (hpc_kd's decision)", "top-4 float32, bins only",
                          "top-4 float16, bins only", "top-4 log8, bins only", "top-4 log8, bins only, tutor dense (unprojected)",
                          "top-4 log8, bins only, union with the tutor's top-4", "sampled 4 draws, tutor on the draws"]
    assert all(0 <= v <= 1 for row in rows.values() for v in row[:5])
    assert "decisions: 16 per sequence, 4 per batch" in out.stdout


@pytest.mark.slow
def test_cache_size_runs_on_a_decoder(tiny_decoder):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cache_size.py"), "--pretrained", str(tiny_decoder),
                          "--ks", "4", "--examples", "8", "--max-length", "16", "--threads", "1"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT, env=process_env())
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {line.split("|")[1].strip(): float(line.split("|")[4]) for line in out.stdout.splitlines()
            if line.startswith("| ") and "| 4 |" in line}
    assert list(rows) == ["before issue 19 (float32, Snappy)", "compact, float32", "compact, float16", "compact, log8"]
    assert rows["compact, log8"] < rows["compact, float16"] < rows["compact, float32"]



@pytest.mark.slow
def test_gpu_script_runs_every_step_in_its_cpu_smoke_mode(tiny_decoder, tiny_model, tmp_path):
    """benchmarks/gpu.sh --cpu-smoke: the four GPU measurements at tiny sizes on CPU, offline, with
    the tiny test models; every step runs and the figures file holds each benchmark's rows."""
    figures = tmp_path / "out" / "gpu_figures.md"
    out = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--cpu-smoke", "--out", str(figures)],
                         capture_output=True, text=True, timeout=600, cwd=ROOT,
                         env=process_env(HPC_KD_LM_TEACHER=str(tiny_decoder), HPC_KD_ENCODER=str(tiny_model)))
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    text = figures.read_text()
    for step in ("1. LM training fidelity", "2. LM step cost", "3. fine-tuning throughput", "4. classification cache ratios"):
        assert any(line.startswith(step) and ": ok in " in line for line in text.splitlines()), step
    rows = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| (")]
    assert rows[:3] == ["(a) dense teacher, live", "(b) top-8 + tail cache, float32", "(c) top-8 + tail cache, log8 (default)"]
    assert rows[3:] == ["(a) student next-token CE only (floor)", "(b) KD, cached teacher", "(c) KD, live teacher",
                        "(d) TEID, cached teacher + frozen cached tutor", "(e) TEID, live teacher + live online tutor (Alg. 2)",
                        "(f) TEID, cached teacher + live online tutor"]
    for needle in ("(c)/(a) - 1 = ", "(e)/(d) = ", "cache write: ", "cache I/O: ",
                   "throughput ratio, hpc_kd DeepSpeed / HF Trainer (same batches):"):
        assert needle in text, needle
    # step 3, finetune_throughput.py: the four trainers, and the HF Trainer padded exactly as many
    # tokens as hpc_kd on the same batches (the script also checks each batch)
    tokens = {line.split("|")[1].strip(): line.split("|")[4].strip() for line in text.splitlines()
              if line.startswith("| ") and ("hpc_kd" in line.split("|")[1] or "HF Trainer" in line.split("|")[1])}
    assert set(tokens) == {"hpc_kd loop", "hpc_kd DeepSpeed", "HF Trainer, same batches", "HF Trainer, default"}
    assert tokens["HF Trainer, same batches"] == tokens["hpc_kd loop"] == tokens["hpc_kd DeepSpeed"]
    assert "all steps ran" in out.stdout


def test_sparse_loss_benchmark_runs_and_its_variants_agree():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sparse_loss.py"), "--batch", "2", "--length", "4",
                          "--vocab", "100", "--k", "8", "--rounds", "1", "--threads", "1"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, env=process_env())
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split("|")[1].strip() for line in out.stdout.splitlines() if line.startswith("| (")]
    assert rows == ["(i) cross-entropy", "(ii) sparse KL (hpc_kd)", "(iii) sparse KL, autograd",
                    "(iv) sparse KL, logsumexp + min-scatter", "(v) sparse KL, logsumexp + scatter",
                    "(vi) α KL + (1 − α) CE, apart", "(vii) α KL + (1 − α) CE, fused (hpc_kd)"]
    deltas = [float(x) for line in out.stdout.splitlines() if "against (ii)" in line or "against (vi)" in line
              for x in (line.split("loss |Δ| = ")[1].split(",")[0], line.split("gradient max |Δ| = ")[1])]
    assert len(deltas) == 8 and max(deltas) < 1e-4
