"""Students and tutors of any causal-LM architecture sharing the teacher's tokenizer (issue 18,
items 1 and 2): pretrained decoders taken as they are, fresh models of the teacher's family with
other sizes, tokenizers compared at plan time, embedding rows padded past the vocabulary ignored."""
import json
import shutil
import subprocess
import sys

import pytest
import torch

from hpc_kd.config import ConfigError
from hpc_kd.models import load_tokenizer, tokenizer_difference
from hpc_kd.plan import build_plan, expand, experiment

from .conftest import (build_tiny_decoder, interrupt_and_resume, make_plan, run_plan, strip_times, tiny_config,
                       write_yaml)
from .test_lm import lm_sections

QUICK = {"lr": 3e-3, "batch_size": 16, "epochs": 1}
WIDE = {"hidden_size": 48, "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2}


def padded(src, dst, extra: int):
    """``src`` with ``extra`` embedding rows past its tokenizer's vocabulary (input and output),
    set to large values: they would change every loss if they were taken for tokens."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src)
    n = model.get_input_embeddings().num_embeddings
    model.resize_token_embeddings(n + extra, mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight[n:] = 3.0
        model.get_output_embeddings().weight[n:] = 3.0
    model.save_pretrained(dst)
    load_tokenizer(str(src), lm=True).save_pretrained(dst)
    assert json.loads((dst / "config.json").read_text())["vocab_size"] == n + extra
    return dst


def renamed(src, dst, token_id: int, new: str):
    """A copy of ``src`` whose tokenizer calls token ``token_id`` ``new``: another tokenizer."""
    shutil.copytree(src, dst)
    spec = json.loads((dst / "tokenizer.json").read_text())
    old = next(t for t, i in spec["model"]["vocab"].items() if i == token_id)
    spec["model"]["vocab"] = {(new if t == old else t): i for t, i in spec["model"]["vocab"].items()}
    (dst / "tokenizer.json").write_text(json.dumps(spec))
    vocab = (dst / "vocab.txt").read_text().split("\n")
    vocab[token_id] = new
    (dst / "vocab.txt").write_text("\n".join(vocab))
    return dst


@pytest.fixture(scope="module")
def decoders(tiny_decoder, tmp_path_factory):
    root = tmp_path_factory.mktemp("decoders")
    small = build_tiny_decoder(root / "small", layers=2)
    return {"teacher": tiny_decoder, "small": small,
            "teacher_padded": padded(tiny_decoder, root / "teacher_padded", 5),
            "small_padded": padded(small, root / "small_padded", 3),
            "other": renamed(tiny_decoder, root / "other", 1500, "zzqx")}


def sections(teacher, **extra):
    return lm_sections(teacher, **{"teacher": {"train": QUICK}, "tutor": {"train": QUICK},
                                   "student": {"train": {**QUICK, "patience": 2}}, **extra})


def test_tokenizers_are_compared(decoders):
    tok = load_tokenizer(str(decoders["teacher"]), lm=True)
    assert tokenizer_difference(tok, load_tokenizer(str(decoders["teacher_padded"]), lm=True)) is None
    diff = tokenizer_difference(load_tokenizer(str(decoders["other"]), lm=True), tok, ("other", "teacher"))
    assert diff.startswith("token id 1500 is 'zzqx' in other and ") and diff.endswith(" in teacher")


def test_a_different_tokenizer_is_refused_before_anything_runs(decoders, tmp_path):
    teacher, other = decoders["teacher"], decoders["other"]
    for key in ("student", "tutor"):
        cfg = tiny_config(teacher, tmp_path / "out", **sections(teacher, **{key: {"pretrained": str(other)}}))
        with pytest.raises(ConfigError) as err:
            experiment(cfg)
        assert err.value.key == f"{key}.pretrained"
    path = write_yaml(tmp_path / "s.yaml", cfg)
    proc = subprocess.run([sys.executable, "-m", "hpc_kd.launch", str(path), "--executor", "local"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0
    line = proc.stderr.strip()
    assert line.startswith("config error: tutor.pretrained: ")
    assert str(other) in line and str(teacher) in line and "'zzqx'" in line
    assert not (tmp_path / "out").exists()


def test_how_a_model_is_built_is_its_signature(decoders, tmp_path):
    teacher = decoders["teacher"]
    plan = make_plan(teacher, tmp_path, **sections(teacher, student={"config": WIDE}))
    student = list(plan.stages.values())[-1]
    assert student.arch == WIDE and student.layers == 2 and student.init == "random"
    grid = {**tiny_config(teacher, tmp_path, **sections(teacher, student={"config": WIDE})),
            "grid": {"student.config.hidden_size": [48, 64]}}
    cells, axes = expand(grid)
    assert axes == ("student.config.hidden_size",) and [c.student.config.hidden_size for _, c in cells] == [48, 64]
    keys = {cell.chain[-1] for cell in build_plan(cells).cells}
    pruned = make_plan(teacher, tmp_path, **sections(teacher)).cells[0].chain[-1]
    assert len(keys | {pruned}) == 3
    plan = make_plan(teacher, tmp_path, **sections(teacher, tutor={"pretrained": str(decoders["small"])}))
    tutor = list(plan.stages.values())[1]
    assert tutor.init_from == str(decoders["small"]) and tutor.layers is None and tutor.depth == 2
    with pytest.raises(ConfigError, match="give one entry"):
        experiment(tiny_config(teacher, tmp_path, **sections(teacher, student={"pretrained": str(teacher), "layers": [2, 1]})))


def _chain(teacher, student, tutor_config=None):
    tutor = {"config": tutor_config} if tutor_config else {}
    return sections(teacher, student=student, tutor=tutor,
                    distill={"policy": "min_loss", "targets": "cache", "tutor_update": "frozen", "sparse_k": 8})


def test_padded_vocabularies_give_the_losses_of_unpadded_ones(decoders, tmp_path):
    results = []
    for teacher, student in (("teacher", "small"), ("teacher_padded", "small_padded")):
        plan = make_plan(decoders[teacher], tmp_path / teacher,
                         **_chain(decoders[teacher], {"pretrained": str(decoders[student])}, {"hidden_size": 48}))
        assert [s.kind for s in plan.stages.values()] == ["finetune", "cache", "distill", "cache", "distill"]
        out = run_plan(plan)
        results.append([{k: out[key][k] for k in ("validation", "params", "layers")} for key in plan.stages
                        if out[key].get("kind") != "cache"])
    assert results[0] == results[1]
    assert results[0][-1]["layers"] == 2


@pytest.mark.parametrize("student", [{"config": WIDE}, {"config": {"hidden_size": 16, "num_attention_heads": 2}, "layers": [1]},
                                     "pretrained"], ids=["wider", "narrower_shallower", "pretrained"])
def test_students_of_other_sizes_distil_and_resume(decoders, tmp_path, student):
    teacher = decoders["teacher"]
    student = {"pretrained": str(decoders["small"])} if student == "pretrained" else student
    reference = run_plan(make_plan(teacher, tmp_path / "ref", **_chain(teacher, student)))
    plan = make_plan(teacher, tmp_path / "resumed", **_chain(teacher, student))
    key = list(plan.stages)[-1]
    resumed = interrupt_and_resume(plan, key, 2)
    assert strip_times(resumed) == strip_times(reference[key])
    assert resumed["params"] != reference[list(plan.stages)[2]]["params"]  # not the tutor's size
