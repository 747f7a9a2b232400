"""The training input pipeline: documents -> tokens -> packed rows -> batches, on Grain.

    docs (random access)  --shard by host-->  --shuffle(seed), repeat-->  --tokenise: bos + text + eos-->
    --concat-then-split into seq_len rows-->  --batch-->  {"tokens", "segment_ids", "positions"}

Why this shape: every stage before packing is a Grain `MapDataset` over document *indices*, so the
shuffle is a global index permutation (no shuffle buffer, no memory cost, reshuffled every epoch) and
the iterator state is a handful of integers, which the trainer stores as JSON in its Orbax checkpoint.
Packing is greedy concat-then-split (Grain's `ConcatThenSplitIterDataset`): no token is wasted on
padding while training, and a document longer than a row continues in the next row (its positions
restart at 0 there, as the model never sees the earlier part in that row).

Sources and their document rule (errors name the file, and the line for JSONL):
  embedded     the generated corpus in `dsjax.data.corpus` (own train/eval splits);
  text         one document per blank-line-separated block (`text_split="blank_line"`) or per file
               (`text_split="file"`);
  jsonl        one JSON object per non-blank line, document = obj[text_field];
  arrayrecord  one document per record: UTF-8 text, or JSON with text_field (`record_format`);
  tfds         `tfds.data_source(tfds_name, split=..., data_dir=tfds_data_dir)`, document = ex[text_field].
Eval split: `eval_paths` / `tfds_eval_split` when given, else a fixed `eval_fraction` of the documents
(chosen independently of the training seed, so train and eval never overlap whatever the seed).
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Any, Callable, Iterator, Sequence

import grain
import numpy as np

from dsjax.errors import DataError  # noqa: F401 (re-exported: dsjax.train.data.DataError)
from dsjax.train.tokenizer import load_tokenizer

SOURCES = ("embedded", "text", "jsonl", "arrayrecord", "tfds")
_SPLIT_SEED = 0x5EED  # the train/eval partition must not depend on the training seed


@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: str = "embedded"
    paths: tuple[str, ...] = ()  # files or globs, read in sorted order
    eval_paths: tuple[str, ...] = ()  # held-out files; if empty, eval_fraction of `paths` is held out
    text_field: str = "text"  # JSONL / JSON-record / TFDS field holding the document
    text_split: str = "blank_line"  # text files: "blank_line" (one doc per block) | "file"
    record_format: str = "auto"  # arrayrecord: "text" | "json" | "auto" (JSON object if it parses)
    tokenizer: str | None = None  # tokenizer.json (or its directory); None = byte tokenizer
    tfds_name: str | None = None
    tfds_data_dir: str | None = None
    tfds_train_split: str = "train"
    tfds_eval_split: str | None = None  # None: hold out eval_fraction of the train split
    eval_fraction: float = 0.05
    shuffle: bool = True  # global per-epoch document shuffle (index permutation: no buffer needed)
    num_threads: int = 2  # tokenisation threads; output order does not depend on it
    prefetch: int = 16  # documents read ahead per iterator

    def __post_init__(self):
        for name in ("paths", "eval_paths"):
            v = getattr(self, name)
            if isinstance(v, str):
                v = (v,)
            if not all(isinstance(p, str) for p in v):
                raise DataError(f"data.{name}: expected a list of path strings, got {v!r}")
            object.__setattr__(self, name, tuple(v))
        if self.source not in SOURCES:
            raise DataError(f"data.source: {self.source!r} is not one of {SOURCES}")
        if self.source in ("text", "jsonl", "arrayrecord") and not self.paths:
            raise DataError(f"data.paths: source {self.source!r} needs at least one file")
        if self.source == "tfds" and not self.tfds_name:
            raise DataError("data.tfds_name: source 'tfds' needs a dataset name")
        if self.text_split not in ("blank_line", "file"):
            raise DataError(f"data.text_split: {self.text_split!r} is not 'blank_line' or 'file'")
        if self.record_format not in ("auto", "text", "json"):
            raise DataError(f"data.record_format: {self.record_format!r} is not 'auto', 'text' or 'json'")
        if not isinstance(self.text_field, str) or not self.text_field:
            raise DataError(f"data.text_field: expected a non-empty string, got {self.text_field!r}")
        if not 0.0 <= float(self.eval_fraction) < 1.0:
            raise DataError(f"data.eval_fraction: {self.eval_fraction} is not in [0, 1)")
        if int(self.num_threads) < 0 or int(self.prefetch) < 0:
            raise DataError("data.num_threads / data.prefetch: must be >= 0")


# ----------------------------------------------------------------------------------------- sources

def _expand(patterns: Sequence[str]) -> list[str]:
    """Globs -> sorted file list; a pattern matching nothing is an error naming it."""
    files: list[str] = []
    for p in patterns:
        if glob.has_magic(p):
            hits = sorted(glob.glob(p))
            if not hits:
                raise DataError(f"{p}: no file matches this pattern")
            files.extend(hits)
        else:
            if not os.path.exists(p):
                raise DataError(f"{p}: no such file")
            if os.path.isdir(p):
                raise DataError(f"{p}: is a directory, expected a file (use a glob such as {p}/*)")
            files.append(p)
    return files


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from e


def text_documents(path: str, split: str = "blank_line") -> list[str]:
    """Documents of one plain-text file: blank-line-separated blocks, or the whole file."""
    raw = _read_text(path)
    if split == "file":
        docs = [raw.strip()] if raw.strip() else []
    else:
        docs, block = [], []
        for line in raw.splitlines():
            if line.strip():
                block.append(line)
            elif block:
                docs.append("\n".join(block))
                block = []
        if block:
            docs.append("\n".join(block))
    if not docs:
        raise DataError(f"{path}: no documents (the file is empty or only whitespace)")
    return docs


def jsonl_documents(path: str, field: str = "text") -> list[str]:
    """Documents of one JSONL file; a bad line is an error naming file:line."""
    docs = []
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from e
        if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
            raise DataError(f"{path}:{lineno}: expected a JSON object with a string field {field!r}")
        if obj[field]:
            docs.append(obj[field])
    if not docs:
        raise DataError(f"{path}: no documents (no non-empty {field!r} values)")
    return docs


class _Concat(Sequence):
    """Several random-access sources as one, remembering which file each index came from."""

    def __init__(self, parts: Sequence[Sequence], names: Sequence[str]):
        self._parts, self._names = list(parts), list(names)
        self._starts = np.cumsum([0] + [len(p) for p in parts])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def locate(self, i: int) -> tuple[int, int]:
        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        return k, int(i - self._starts[k])

    def __getitem__(self, i):
        k, j = self.locate(int(i))
        return self._parts[k][j]

    def name(self, i: int) -> str:
        k, j = self.locate(int(i))
        return f"{self._names[k]}: record {j}"


def _arrayrecord_source(paths: Sequence[str], field: str, fmt: str) -> tuple[Sequence, Callable[[int], str]]:
    files = _expand(paths)
    parts = []
    for f in files:
        try:
            src = grain.sources.ArrayRecordDataSource([f])
        except Exception as e:  # noqa: BLE001 — array_record raises plain RuntimeError/ValueError
            raise DataError(f"{f}: cannot open as ArrayRecord: {e}") from e
        if len(src) == 0:
            raise DataError(f"{f}: no documents (the ArrayRecord file has no records)")
        parts.append(src)
    recs = _Concat(parts, files)

    def read(i: int) -> str:
        raw = recs[i]
        try:
            text = raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else str(raw)
        except UnicodeDecodeError as e:
            raise DataError(f"{recs.name(i)}: not UTF-8 ({e.reason})") from e
        if fmt == "text" or (fmt == "auto" and not text.lstrip().startswith("{")):
            return text
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            if fmt == "auto":
                return text
            raise DataError(f"{recs.name(i)}: invalid JSON ({e.msg})") from e
        if isinstance(obj, dict) and isinstance(obj.get(field), str):
            return obj[field]
        if fmt == "auto":
            return text
        raise DataError(f"{recs.name(i)}: expected a JSON object with a string field {field!r}")

    return recs, read


def _tfds_source(cfg: DataConfig, split_name: str) -> tuple[Sequence, Callable[[int], str]]:
    try:
        import tensorflow_datasets as tfds  # lazy: optional dependency, heavy import
    except ImportError as e:
        raise DataError("data.source='tfds' needs `pip install tensorflow-datasets` "
                        "(TensorFlow itself is not required for tfds.data_source)") from e
    where = f"tfds {cfg.tfds_name}[{split_name}]" + (f" in {cfg.tfds_data_dir}" if cfg.tfds_data_dir else "")
    try:
        src = tfds.data_source(cfg.tfds_name, split=split_name, data_dir=cfg.tfds_data_dir)
    except Exception as e:  # noqa: BLE001 — tfds raises many types; the dataset name is what matters
        raise DataError(f"{where}: cannot open: {e}") from e
    if len(src) == 0:
        raise DataError(f"{where}: no documents")
    field = cfg.text_field

    def read(i: int) -> str:
        ex = src[i]
        if not isinstance(ex, dict) or field not in ex:
            raise DataError(f"{where}: example {i} has no field {field!r}")
        v = ex[field]
        v = v.item() if isinstance(v, np.ndarray) and v.ndim == 0 else v
        return v.decode("utf-8") if isinstance(v, (bytes, bytearray)) else str(v)

    return src, read


def _in_memory(cfg: DataConfig, paths: Sequence[str]) -> list[str]:
    docs: list[str] = []
    for f in _expand(paths):
        docs.extend(text_documents(f, cfg.text_split) if cfg.source == "text" else jsonl_documents(f, cfg.text_field))
    return docs


def _documents(cfg: DataConfig, split: str) -> tuple[int, Callable[[int], str], np.ndarray]:
    """(n, read(i) -> text, the indices of `split`) for any source."""
    from dsjax.data.corpus import embedded_documents

    explicit = {"embedded": True, "tfds": cfg.tfds_eval_split is not None}.get(cfg.source, bool(cfg.eval_paths))
    if cfg.source == "embedded":
        docs = embedded_documents(split)
        return len(docs), docs.__getitem__, np.arange(len(docs))
    if cfg.source == "tfds":
        n_split = cfg.tfds_eval_split if (split == "eval" and explicit) else cfg.tfds_train_split
        src, read = _tfds_source(cfg, n_split)
    elif cfg.source == "arrayrecord":
        src, read = _arrayrecord_source(cfg.eval_paths if (split == "eval" and explicit) else cfg.paths,
                                        cfg.text_field, cfg.record_format)
    else:
        src = _in_memory(cfg, cfg.eval_paths if (split == "eval" and explicit) else cfg.paths)
        read = src.__getitem__
    n = len(src)
    if explicit:
        return n, read, np.arange(n)
    return n, read, holdout_indices(n, cfg.eval_fraction, split)


def holdout_indices(n: int, eval_fraction: float, split: str) -> np.ndarray:
    """Sorted document indices of `split` when eval is a held-out fraction (fixed seed, not the run's)."""
    n_eval = 0 if eval_fraction <= 0 else max(1, int(round(eval_fraction * n)))
    if split == "eval" and n_eval == 0:
        raise DataError("data.eval_fraction: is 0 and no eval_paths / tfds_eval_split given: there is no eval split")
    if n_eval >= n:
        raise DataError(f"data.eval_fraction: {eval_fraction} of {n} documents leaves none for training")
    perm = np.random.default_rng(_SPLIT_SEED).permutation(n)
    return np.sort(perm[:n_eval] if split == "eval" else perm[n_eval:])


# ---------------------------------------------------------------------------------------- pipeline

def _pad_batch(batch_size: int) -> Callable[[Sequence[dict]], dict]:
    """Stack rows, padding a short final batch (eval) with all-padding rows so shapes stay static."""
    def stack(rows: Sequence[dict]) -> dict:
        out = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        missing = batch_size - len(rows)
        if missing:
            out = {k: np.concatenate([v, np.zeros((missing,) + v.shape[1:], v.dtype)]) for k, v in out.items()}
        return out
    return stack


def make_dataset(cfg: DataConfig, *, seq_len: int, batch_size: int, seed: int, split: str = "train",
                 process_index: int | None = None, process_count: int | None = None) -> grain.DatasetIterator:
    """A checkpointable iterator of batches {tokens, segment_ids, positions}: int32 [batch_size, seq_len].

    segment_ids number the documents in a row 1, 2, ... (0 = padding); positions restart at 0 at every
    document (and at the start of a row that continues a split document). "train" shuffles with `seed`
    and repeats forever; "eval" is one ordered pass whose last batch is padded with segment-0 rows.
    Each host reads a disjoint shard of the documents (`process_index::process_count`, by default
    from jax). `get_state()` is JSON-serialisable; a fresh iterator built with the same arguments and
    given that state via `set_state()` yields exactly the batches the original would have.
    """
    if split not in ("train", "eval"):
        raise DataError(f"split: {split!r} is not 'train' or 'eval'")
    if seq_len < 2 or batch_size < 1:
        raise DataError(f"seq_len / batch_size: need seq_len >= 2 and batch_size >= 1, got {seq_len}, {batch_size}")
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index: {process_index} is not in [0, {process_count})")

    tok = load_tokenizer(cfg.tokenizer)
    n, read, idx = _documents(cfg, split)
    shard = idx[process_index::process_count]
    if len(shard) == 0:
        raise DataError(f"data: {split} split has {len(idx)} documents, too few for {process_count} processes "
                        f"(process {process_index} gets none)")

    def tokenize(i) -> dict[str, np.ndarray]:
        ids = [tok.bos_id, *tok.encode(read(int(i))), tok.eos_id]
        return {"tokens": np.asarray(ids, np.int32)}

    ds = grain.MapDataset.source(shard.tolist())
    if split == "train":
        if cfg.shuffle:
            ds = ds.shuffle(seed=int(seed) % 2**32)
        ds = ds.repeat(None)  # reseeded each epoch: a new permutation per epoch
    ds = ds.map(tokenize)
    read_opts = grain.ReadOptions(num_threads=int(cfg.num_threads), prefetch_buffer_size=int(cfg.prefetch))
    packed = grain.experimental.ConcatThenSplitIterDataset(ds.to_iter_dataset(read_opts),
                                                           length_struct={"tokens": seq_len})
    rows = packed.map(lambda r: {"tokens": r["tokens"].astype(np.int32),
                                 "segment_ids": r["tokens_segment_ids"].astype(np.int32),
                                 "positions": r["tokens_positions"].astype(np.int32)})
    return iter(rows.batch(batch_size, drop_remainder=split == "train", batch_fn=_pad_batch(batch_size)))


def state_to_bytes(state: dict[str, Any]) -> bytes:
    """Iterator state as UTF-8 JSON (it holds only ints, strings and lists)."""
    return json.dumps(state, sort_keys=True).encode("utf-8")


def state_from_bytes(data: bytes) -> dict[str, Any]:
    return json.loads(data.decode("utf-8"))


def iterate_documents(cfg: DataConfig, split: str = "train") -> Iterator[str]:
    """The documents of a split in file order (no shuffle, no sharding): for inspection and tools."""
    _, read, idx = _documents(cfg, split)
    return (read(int(i)) for i in idx)
