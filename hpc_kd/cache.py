"""Logit caches: a frozen model's logits over a split, in Parquet shards, read back by example id.

Layout of a cache folder::

    part-r000-00000.parquet   example_id: int64, logits: fixed_size_list<float32>[num_labels]
    part-r000-00001.parquet   (sorted by id; rank r covers the r-th contiguous slice of sorted ids)
    shards-r000.json          what rank r wrote (its shards' rows, id range and sha256)
    manifest.json             written last, by rank 0: schema, producer fingerprint, every shard

The producer fingerprint names what made the logits: the weights' hash, the tokeniser's hash,
max length, dataset name, split and the split's content fingerprint. A reader passes the
fingerprint it expects and the ids it will ask for; any difference, a missing or truncated
shard, or a checksum mismatch raises :class:`CacheError`. Logits are never served unchecked.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .rundir import read_json, write_json

CACHE_SCHEMA = 1
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json",
                   "merges.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja")


class CacheError(RuntimeError):
    """A cache that cannot be trusted for the data being trained on."""


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weights_hash(model_dir: Path) -> str:
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise CacheError(f"no safetensors weights in {model_dir}")
    return hashlib.sha256("".join(file_sha256(f) for f in files).encode()).hexdigest()[:16]


def tokenizer_hash(model_dir: Path) -> str:
    h = hashlib.sha256()
    for name in TOKENIZER_FILES:
        path = Path(model_dir) / name
        if path.is_file():
            h.update(name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def producer(model_dir: Path, max_length: int, dataset: str, split: str, data_fingerprint: str) -> dict:
    """The fingerprint of what produces a cache's logits."""
    return {"weights": weights_hash(model_dir), "tokenizer": tokenizer_hash(model_dir), "max_length": max_length,
            "dataset": dataset, "split": split, "data": data_fingerprint}


def _shard_name(rank: int, index: int) -> str:
    return f"part-r{rank:03d}-{index:05d}.parquet"


def _read_shard(path: Path) -> pa.Table:
    return pq.read_table(path)


def _shard_ok(path: Path, ids: np.ndarray, fingerprint: str) -> bool:
    """A shard left by an earlier attempt is kept when it is readable, made by the same producer
    and holds exactly the examples it should (a sparse shard: a row per token of each); shards are
    renamed into place, so never half-written."""
    try:
        meta = pq.read_schema(path).metadata or {}
        if meta.get(b"producer") != fingerprint.encode() or "position" in pq.read_schema(path).names:
            return False  # another producer, or a sparse shard of the layout before issue 19
        got = _read_shard(path).column("example_id").to_numpy()
        return np.array_equal(np.unique(got), np.unique(ids))
    except Exception:
        return False


def _fingerprint_text(prod: dict) -> str:
    return json.dumps(prod, sort_keys=True)


@torch.no_grad()
def write_rank(folder: Path, model, encoded, prod: dict, num_labels: int, *, rows_per_shard: int = 4096,
               batch_size: int = 128, device="cpu", rank: int = 0, world_size: int = 1, progress: bool = False) -> list[dict]:
    """Compute and write rank ``rank``'s shards (skipping valid ones from an earlier attempt)."""
    from .data import eval_batches
    from .sources import forward

    model = model.eval().to(device)

    def table(rows: np.ndarray, index: int) -> pa.Table:
        logits = np.zeros((len(rows), num_labels), dtype=np.float32)
        lengths = np.array([len(encoded.tokens[r]) for r in rows])
        for local in eval_batches(lengths, batch_size):
            batch = {k: v.to(device) for k, v in encoded.collate(rows[local]).items()}
            logits[local] = forward(model, batch).float().cpu().numpy()
        flat = pa.array(logits.reshape(-1), type=pa.float32())
        return pa.Table.from_arrays([pa.array(encoded.ids[rows], type=pa.int64()),
                                     pa.FixedSizeListArray.from_arrays(flat, num_labels)], names=["example_id", "logits"])

    return _write_shards(folder, encoded, prod, table, rows_per_shard=rows_per_shard, rank=rank, world_size=world_size,
                         progress=progress, unit="ex")


def _write_shards(folder: Path, encoded, prod: dict, table, *, rows_per_shard: int, rank: int, world_size: int,
                  progress: bool, unit: str, parquet: dict | None = None) -> list[dict]:
    """Rank ``rank``'s slice of the examples (sorted by id), ``rows_per_shard`` examples a shard;
    the ``index``-th shard is the Parquet file of ``table(rows, index)`` stamped with the producer
    (written with ``parquet``'s options) and renamed into place, or kept when an earlier attempt
    left a valid one; then the rank's listing."""
    from tqdm.auto import tqdm

    from .rundir import write_atomic

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    order = np.argsort(encoded.ids, kind="stable")
    mine = np.array_split(order, world_size)[rank]
    fingerprint = _fingerprint_text(prod)
    infos = []
    chunks = [mine[i:i + rows_per_shard] for i in range(0, len(mine), rows_per_shard)]
    bar = tqdm(total=len(mine), disable=not progress, leave=False, desc=f"cache {folder.parent.name} r{rank}", unit=unit)
    for index, rows in enumerate(chunks):
        path = folder / _shard_name(rank, index)
        ids = encoded.ids[rows]
        if not _shard_ok(path, ids, fingerprint):
            tmp = path.with_name("." + path.name + ".tmp")
            pq.write_table(table(rows, index).replace_schema_metadata({"producer": fingerprint}), tmp, **(parquet or {}))
            tmp.replace(path)
        infos.append({"file": path.name, "rank": rank, "rows": int(pq.read_metadata(path).num_rows),
                      "sha256": file_sha256(path), "min_id": int(ids[0]), "max_id": int(ids[-1])})
        bar.update(len(rows))
    bar.close()
    write_atomic(folder / f"shards-r{rank:03d}.json", json.dumps(infos))
    return infos


def finalize(folder: Path, prod: dict, num_labels: int, world_size: int = 1, sparse: dict | None = None) -> dict:
    """Rank 0, after every rank has written: one manifest covering every rank's shards (and a
    sparse cache's settings; its ``num_labels`` is the vocabulary size)."""
    folder = Path(folder)
    shards = []
    for rank in range(world_size):
        listing = folder / f"shards-r{rank:03d}.json"
        if not listing.is_file():
            raise CacheError(f"rank {rank} did not finish writing {folder}")
        shards += json.loads(listing.read_text())
    manifest = {"schema": CACHE_SCHEMA, "producer": prod, "num_labels": num_labels, "world_size": world_size,
                "total_rows": sum(s["rows"] for s in shards), "shards": shards,
                "bytes": sum((folder / s["file"]).stat().st_size for s in shards)}
    if sparse is not None:
        manifest["sparse"] = dict(sparse)
    write_json(folder / "manifest.json", manifest)
    return manifest


def write_cache(folder: Path, model, encoded, prod: dict, num_labels: int, sparse: dict | None = None, **kw) -> dict:
    """Write a whole cache: every shard, then the manifest. Called on every rank of a job
    (:mod:`hpc_kd.distributed`), each rank writes its slice, then rank 0 the one manifest. With
    ``sparse`` (and ``support``, in ``kw``), a language model's sparse targets
    (:func:`write_sparse_rank`; ``num_labels`` is then the vocabulary size)."""
    from . import distributed

    world = distributed.current()
    kw["progress"] = kw.get("progress", False) and world.is_main
    if sparse is None:
        write_rank(folder, model, encoded, prod, num_labels, rank=world.rank, world_size=world.size, **kw)
    else:
        write_sparse_rank(folder, model, encoded, prod, sparse, rank=world.rank, world_size=world.size, **kw)
    distributed.barrier()  # a no-op on one rank
    manifest = finalize(folder, prod, num_labels, world.size, sparse) if world.is_main else None
    return distributed.broadcast(manifest)


def _checked_shards(folder: Path, expected: dict) -> tuple[dict, list]:
    """The manifest and its shards' tables, each checked against the manifest (schema, producer,
    checksum, rows, id range); raises CacheError, or KeyError / ValueError / TypeError for a
    manifest that does not have the shape this code writes."""
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise CacheError(f"{folder}: no manifest.json (cache incomplete)")
    manifest = read_json(manifest_path)
    if not isinstance(manifest, dict):
        raise TypeError(f"the manifest is a {type(manifest).__name__}, not a mapping")
    if manifest.get("schema") != CACHE_SCHEMA:
        raise CacheError(f"{folder}: cache schema {manifest.get('schema')} is not {CACHE_SCHEMA}")
    for key, want in expected.items():
        got = manifest["producer"].get(key)
        if got != want:
            raise CacheError(f"{folder}: produced with a different {key} ({got!r}, training uses {want!r})")
    tables = []
    for shard in manifest["shards"]:
        path = folder / shard["file"]
        if not path.is_file():
            raise CacheError(f"{folder}: shard {shard['file']} is missing")
        if file_sha256(path) != shard["sha256"]:
            raise CacheError(f"{folder}: shard {shard['file']} fails its checksum (corrupt or truncated)")
        table = _read_shard(path)
        if table.num_rows != shard["rows"]:
            raise CacheError(f"{folder}: shard {shard['file']} holds {table.num_rows} rows, manifest says {shard['rows']}")
        ids = table.column("example_id").to_numpy()
        if len(ids) and (int(ids[0]), int(ids[-1])) != (int(shard["min_id"]), int(shard["max_id"])):
            raise CacheError(f"{folder}: shard {shard['file']} holds ids {ids[0]}..{ids[-1]}, manifest says "
                             f"{shard['min_id']}..{shard['max_id']}")
        tables.append(table)
    int(manifest["num_labels"]), int(manifest["total_rows"])  # present and numbers
    return manifest, tables


def _checked_table(folder: Path, expected: dict, sparse: dict | None = None) -> tuple[dict, pa.Table]:
    """The manifest and all its rows, checked (:func:`_checked_shards`, the row count, and for a
    sparse cache its settings); a manifest cut short, missing a field or holding the wrong types
    is a damaged cache (CacheError), like a bad checksum."""
    try:
        manifest, tables = _checked_shards(folder, expected)
        if sparse is not None and manifest.get("sparse") != sparse:
            raise CacheError(f"{folder}: sparse settings {manifest.get('sparse')} are not {sparse}")
    except (ValueError, KeyError, TypeError, AttributeError, OSError, pa.ArrowException) as err:
        raise CacheError(f"{folder}: manifest.json cannot be read or lacks a field "
                         f"({type(err).__name__}: {err})") from None
    try:
        table = pa.concat_tables(tables).combine_chunks()
    except pa.ArrowException as err:  # shards of two layouts or schemas
        raise CacheError(f"{folder}: shards do not share one schema ({type(err).__name__}: {err})") from None
    if table.num_rows != manifest["total_rows"]:
        raise CacheError(f"{folder}: {table.num_rows} rows, manifest says {manifest['total_rows']}")
    return manifest, table


class LogitCache:
    """Validated, in-memory logits indexed by example id."""

    def __init__(self, ids: np.ndarray, logits: torch.Tensor, manifest: dict):
        self.ids, self.logits_table, self.manifest = ids, logits, manifest

    @classmethod
    def open(cls, folder: Path, expected: dict, ids: np.ndarray) -> "LogitCache":
        """Read and check a cache. ``expected``: the producer fingerprint the caller trains with;
        ``ids``: the example ids it will look up."""
        folder = Path(folder)
        manifest, table = _checked_table(folder, expected)
        cached_ids = table.column("example_id").to_numpy()
        if np.any(np.diff(cached_ids) <= 0):
            raise CacheError(f"{folder}: example ids are not sorted and unique")
        missing = ~np.isin(ids, cached_ids)
        if missing.any():
            raise CacheError(f"{folder}: {int(missing.sum())} of {len(ids)} training examples have no cached logits")
        column = table.column("logits").chunk(0)
        width = manifest["num_labels"]
        # Arrow -> numpy -> torch without copying: the flat float32 buffer seen as [rows, classes].
        flat = column.values.to_numpy(zero_copy_only=True)
        with warnings.catch_warnings():  # Arrow buffers are read-only; lookups copy rows out
            warnings.simplefilter("ignore", UserWarning)
            logits = torch.from_numpy(flat.reshape(-1, width))
        return cls(cached_ids, logits, manifest)

    def logits(self, example_ids: torch.Tensor) -> torch.Tensor:
        rows = np.searchsorted(self.ids, example_ids.cpu().numpy())
        return self.logits_table[torch.from_numpy(rows)]


# -- sparse caches: a language model's top-k (or sampled) targets per token ---------------------
#
#   part-r000-00000.parquet   example_id: int64 (dictionary-encoded: a run per sequence),
#                             ids: fixed_size_binary[k x w], log_probs: fixed_size_binary[k x b],
#                             tail: float32 (log8: uint8); zstd
#
# One row per learnt token (position t of a sequence predicts token t + 1; chat data: only the
# positions before an assistant token, hpc_kd.data.Encoded.positions), sorted by (example_id,
# position), so a row's position is known from its rank within its sequence and the data (which the
# producer fingerprint pins); a sequence never spans two shards. Within a row the k entries are sorted by token id and the ids stored as
# differences from the previous one (the first from 0) in w = 2 bytes (a vocabulary up to 65,536)
# or 4, all low bytes first, then the high ones: small differences with constant high bytes, which
# zstd packs to about 9 bits an id. The log-probabilities follow in the same order, b bytes each
# (float32 4, float16 2, log8 1: hpc_kd.sparse.encoded). The manifest adds ``sparse`` (kind, k,
# precision, tau: the targets are tempered when written) and counts rows as tokens. The same
# producer fingerprint, per-rank shards, checksums and validation as the dense caches, and every
# value is checked when read (ids inside the vocabulary, log-probabilities and tail ≤ 0): a value
# out of range is a damaged cache. Shards of the layout before issue 19 (a ``position`` column,
# int32 ids, float log-probabilities in top-k order, Snappy) are still read.

SPARSE_PARQUET = {"compression": "zstd", "compression_level": 9, "use_dictionary": ["example_id"]}


def _id_width(vocab: int) -> int:
    return 2 if vocab <= 1 << 16 else 4


def _binary(rows: np.ndarray) -> pa.Array:
    """A [n, bytes] uint8 array as a fixed_size_binary column."""
    rows = np.ascontiguousarray(rows, dtype=np.uint8)
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(rows.shape[1]), len(rows), [None, pa.py_buffer(rows.tobytes())])


def _unbinary(column: pa.ChunkedArray, n: int) -> np.ndarray:
    """A fixed_size_binary column as a [n, bytes] uint8 array (no copy)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    width = arr.type.byte_width
    return np.frombuffer(arr.buffers()[1], dtype=np.uint8)[arr.offset * width:(arr.offset + n) * width].reshape(n, width)


def encode_ids(ids: np.ndarray, vocab: int) -> np.ndarray:
    """Sorted ids [n, k] as their byte planes of differences: [n, k x w] uint8."""
    width = _id_width(vocab)
    deltas = np.diff(ids.astype(np.int64), axis=1, prepend=0).astype(np.uint16 if width == 2 else np.uint32)
    return np.concatenate([((deltas >> (8 * b)) & 0xFF).astype(np.uint8) for b in range(width)], axis=1)


def decode_ids(planes: np.ndarray, k: int) -> np.ndarray:
    """:func:`encode_ids` undone: [n, k] int64 ids."""
    width = planes.shape[1] // k
    deltas = np.zeros((len(planes), k), dtype=np.int64)
    for b in range(width):
        deltas |= planes[:, b * k:(b + 1) * k].astype(np.int64) << (8 * b)
    return np.cumsum(deltas, axis=1)


def sparse_table(example_ids: np.ndarray, targets, precision: str, vocab: int) -> pa.Table:
    """One token per row (``example_ids`` [n], ``targets`` flat [n, k]) in the layout above."""
    from .sparse import encoded

    order = targets.ids.argsort(dim=-1, stable=True)
    ids = targets.ids.gather(-1, order).numpy()
    values, tail = encoded(type(targets)(targets.ids, targets.log_probs.gather(-1, order), targets.tail), precision)
    values = values.numpy()
    return pa.Table.from_arrays([
        pa.array(example_ids, type=pa.int64()), _binary(encode_ids(ids, vocab)),
        _binary(values.view(np.uint8).reshape(len(values), values.shape[1] * values.itemsize)), pa.array(tail.numpy())],
        names=["example_id", "ids", "log_probs", "tail"])


def sparse_columns(table: pa.Table, sparse: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A sparse cache's rows as float32 targets: ids [n, k] int64, log_probs [n, k], tail [n]
    (:func:`hpc_kd.sparse.decoded`: log8 codes become renormalised log-probabilities). Raises
    ValueError for a table of another shape."""
    from .sparse import decoded

    k, n, precision = sparse["k"], table.num_rows, sparse["precision"]
    if "position" in table.column_names:  # the layout before issue 19
        ids = table.column("ids").combine_chunks().values.to_numpy().astype(np.int64).reshape(-1, k)
        values = torch.from_numpy(table.column("log_probs").combine_chunks().values.to_numpy().astype(np.float32).reshape(-1, k))
        tail = torch.from_numpy(table.column("tail").to_numpy().astype(np.float32))
        return torch.from_numpy(ids), values, tail
    ids = decode_ids(_unbinary(table.column("ids"), n), k)
    raw = _unbinary(table.column("log_probs"), n)
    dtype = {"float32": np.float32, "float16": np.float16, "log8": np.uint8}[precision]
    if raw.shape[1] != k * np.dtype(dtype).itemsize:
        raise ValueError(f"log_probs hold {raw.shape[1]} bytes a token, not {k} {precision} values")
    values = torch.from_numpy(raw.view(dtype).copy())
    tail = torch.from_numpy(table.column("tail").to_numpy().copy())
    return (torch.from_numpy(ids), *decoded(values, tail, precision))


def _check_values(folder: Path, ids: torch.Tensor, log_probs: torch.Tensor, tail: torch.Tensor, vocab: int) -> None:
    """Every stored value in range, or the cache is damaged: a checksum only says that the file is
    the one written, not that what was written (or put there since, with its checksum) is sane."""
    bad_ids = (ids < 0) | (ids >= vocab)
    if bad_ids.any():
        row, col = (int(i) for i in bad_ids.nonzero()[0])
        raise CacheError(f"{folder}: token id {int(ids[row, col])} (row {row}) is outside the vocabulary [0, {vocab})")
    bad = torch.isnan(log_probs) | (log_probs > 0)
    if bad.any():
        row, col = (int(i) for i in bad.nonzero()[0])
        raise CacheError(f"{folder}: log-probability {float(log_probs[row, col])} (row {row}) is not a log-probability (≤ 0)")
    bad = torch.isnan(tail) | (tail > 0)
    if bad.any():
        row = int(bad.nonzero()[0, 0])
        raise CacheError(f"{folder}: tail {float(tail[row])} (row {row}) is not the log of a mass in [0, 1]")


def sparse_rows(model, encoded, rows: np.ndarray, sparse: dict, device, batch_size: int, seed: int,
                support=None) -> pa.Table:
    """The sparse targets of the sequences ``rows`` of ``encoded``, one table row per token; with
    ``support`` (another model's :class:`SparseLogitCache`), this model's distribution on that
    cache's tokens and tail instead of its own top k (a frozen tutor on its teacher's support)."""
    from .data import eval_batches
    from .sparse import SparseTargets, project, sampled, top_k
    from .sources import forward

    gen = torch.Generator().manual_seed(seed)
    per_seq = {}
    lengths = np.array([len(encoded.tokens[r]) for r in rows])
    positions = [encoded.positions(r) for r in rows]  # the learnt ones: position t predicts token t + 1
    vocab = model.get_output_embeddings().out_features
    for local in eval_batches(lengths, batch_size):
        batch = {k: v.to(device) for k, v in encoded.collate(rows[local]).items()}
        z = forward(model, batch).float()[:, :-1].cpu()
        if support is not None:
            t = project(z, support.targets(batch["example_ids"], z.shape[1] + 1), sparse["tau"])
        elif sparse["kind"] == "top_k":
            t = top_k(z, sparse["k"], sparse["tau"])
        else:
            t = sampled(z, sparse["k"], sparse["tau"], gen)
        for j, i in enumerate(local):
            at = torch.from_numpy(positions[i])
            per_seq[i] = (t.ids[j, at], t.log_probs[j, at], t.tail[j, at])
    flat = SparseTargets(*(torch.cat([per_seq[i][c] for i in range(len(rows))]) for c in range(3)))
    return sparse_table(np.repeat(encoded.ids[rows], [len(p) for p in positions]), flat, sparse["precision"], vocab)


@torch.no_grad()
def write_sparse_rank(folder: Path, model, encoded, prod: dict, sparse: dict, *, rows_per_shard: int = 4096,
                      batch_size: int = 16, device="cpu", rank: int = 0, world_size: int = 1, progress: bool = False,
                      support=None) -> list[dict]:
    """:func:`write_rank` for a language model's sparse targets (``rows_per_shard`` sequences)."""
    model = model.eval().to(device)

    def table(rows: np.ndarray, index: int) -> pa.Table:
        return sparse_rows(model, encoded, rows, sparse, device, batch_size, seed=rank * 100003 + index, support=support)

    return _write_shards(folder, encoded, prod, table, rows_per_shard=rows_per_shard, rank=rank, world_size=world_size,
                         progress=progress, unit="seq", parquet=SPARSE_PARQUET)


class SparseLogitCache:
    """Validated sparse targets, looked up by example id as :class:`hpc_kd.sparse.SparseTargets`
    padded to a batch's width."""

    def __init__(self, starts: dict, table: dict, manifest: dict, positions: dict | None = None):
        self.starts, self.table, self.manifest, self.positions = starts, table, manifest, positions
        self.precision = manifest["sparse"]["precision"]

    @classmethod
    def open(cls, folder: Path, expected: dict, ids: np.ndarray, sparse: dict, vocab: int | None = None,
             positions: dict | None = None) -> "SparseLogitCache":
        """Read and check a cache (:func:`_checked_table`, then every value: ids in
        [0, ``vocab``), the vocabulary the caller trains with, default the manifest's). With
        ``positions`` (example id -> the learnt positions of chat data, Encoded.positions), every
        sequence must hold exactly one row per learnt position; without, rows are positions 0, 1, ..."""
        folder = Path(folder)
        manifest, table = _checked_table(folder, expected, sparse)
        example = table.column("example_id").to_numpy()
        if np.any(np.diff(example) < 0):
            raise CacheError(f"{folder}: rows are not sorted by example id")
        uniq, start, count = np.unique(example, return_index=True, return_counts=True)
        if "position" in table.column_names:  # the layout before issue 19 stores them
            expected_pos = np.arange(len(example)) - np.repeat(start, count)
            if not np.array_equal(table.column("position").to_numpy(), expected_pos):
                raise CacheError(f"{folder}: positions are not 0, 1, ... within each sequence")
        missing = ~np.isin(ids, uniq)
        if missing.any():
            raise CacheError(f"{folder}: {int(missing.sum())} of {len(ids)} training sequences have no cached targets")
        if vocab is not None and vocab != manifest["num_labels"]:
            raise CacheError(f"{folder}: written for a vocabulary of {manifest['num_labels']}, training uses {vocab}")
        try:
            tok, logp, tail = sparse_columns(table, sparse)
        except (ValueError, KeyError, TypeError, pa.ArrowException) as err:
            raise CacheError(f"{folder}: shards do not hold {sparse} targets ({type(err).__name__}: {err})") from None
        _check_values(folder, tok, logp, tail, int(manifest["num_labels"]))
        cols = {"ids": tok, "log_probs": logp, "tail": tail}
        starts = {int(i): (int(s), int(c)) for i, s, c in zip(uniq, start, count)}
        if positions is not None:
            for ex, at in positions.items():
                if ex in starts and starts[ex][1] != len(at):
                    raise CacheError(f"{folder}: sequence {ex} has {starts[ex][1]} cached targets, the data {len(at)} "
                                     f"learnt positions")
        return cls(starts, cols, manifest, positions)

    def targets(self, example_ids: torch.Tensor, width: int):
        """The targets of a batch whose sequences are ``width`` tokens wide: [B, width − 1, k]
        (positions a sequence does not have are padding)."""
        from .sparse import SparseTargets

        k = self.table["ids"].shape[1]
        b = len(example_ids)
        ids = torch.zeros((b, width - 1, k), dtype=torch.int64)
        logp = torch.full((b, width - 1, k), -torch.inf)
        tail = torch.full((b, width - 1), -torch.inf)
        for row, ex in enumerate(example_ids.tolist()):
            start, count = self.starts[int(ex)]
            if self.positions is None:
                n = min(count, width - 1)
                ids[row, :n] = self.table["ids"][start:start + n]
                logp[row, :n] = self.table["log_probs"][start:start + n]
                tail[row, :n] = self.table["tail"][start:start + n]
                continue
            at = torch.from_numpy(self.positions[int(ex)])
            keep = at < width - 1
            rows = torch.arange(start, start + count)[keep]
            ids[row, at[keep]] = self.table["ids"][rows]
            logp[row, at[keep]] = self.table["log_probs"][rows]
            tail[row, at[keep]] = self.table["tail"][rows]
        return SparseTargets(ids, logp, tail, self.precision)
