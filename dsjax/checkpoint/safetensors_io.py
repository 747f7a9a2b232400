"""Streaming safetensors reader and writer, and HF-layout import/export of dsjax params.

The format is simple (8-byte little-endian header length, a JSON header, raw little-endian data), so
we read it with numpy memory maps: one tensor at a time, any dtype including bfloat16 and float8_e4m3fn,
and a clear error for truncated or corrupt files. Pickle-based formats (.bin/.pt/.pth/.ckpt) are refused:
unpickling runs arbitrary code.
"""
from __future__ import annotations

import json
import os
import stat
import struct
from typing import Iterator

import ml_dtypes
import numpy as np


class CheckpointError(ValueError):
    """A checkpoint file or tensor is missing, malformed, or disagrees with the config."""


DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def require_regular_file(path: str) -> None:
    """Refuse a FIFO, device or directory before opening it (reading a FIFO blocks forever)."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{path}: not a regular file (a FIFO, device or directory); refused")


def check_finite(name: str, arr: np.ndarray, file: str) -> None:
    """Raise naming the tensor if it holds NaN or Inf (a corrupt or diverged checkpoint)."""
    if arr.dtype.kind == "f" or arr.dtype in (DTYPES["BF16"], DTYPES["F8_E4M3"], DTYPES["F8_E5M2"]):
        bad = ~np.isfinite(arr.astype(np.float32))
        if bad.any():
            raise CheckpointError(f"{file}: tensor {name} holds {int(bad.sum())} non-finite value(s) (NaN/Inf); "
                                  "refused (pass allow_nonfinite=True / --allow-nonfinite to load it anyway)")


class SafetensorsFile:
    """Lazy reader of one .safetensors file: `keys()`, `shape(k)`, `dtype(k)`, `get(k)` -> np.ndarray."""

    def __init__(self, path: str):
        self.path = path
        if path.endswith(PICKLE_SUFFIXES):
            raise CheckpointError(f"{path}: pickle-based checkpoints are refused (unpickling can run code); "
                                  "convert it to safetensors first")
        require_regular_file(path)
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{path}: truncated safetensors file (no header)")
                (n,) = struct.unpack("<Q", head)
                if n > size - 8 or n > 100_000_000:
                    raise CheckpointError(f"{path}: corrupt safetensors header (claims {n} header bytes, file has {size})")
                header = json.loads(f.read(n))
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read: {e}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header: {e}") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        self._base = 8 + n
        self._header = header
        data_len = size - self._base
        spans = []
        for k, info in header.items():
            try:
                dt, shape, (s, e) = info["dtype"], info["shape"], info["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{path}: tensor {k}: malformed header entry {info!r}") from None
            if dt not in DTYPES:
                raise CheckpointError(f"{path}: tensor {k} has unsupported dtype {dt}")
            if not (isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)):
                raise CheckpointError(f"{path}: tensor {k}: shape {shape!r} is not a list of non-negative integers")
            if not (_is_int(s) and _is_int(e) and 0 <= s <= e):
                raise CheckpointError(f"{path}: tensor {k}: data_offsets {[s, e]} are not integers 0 <= begin <= end")
            want = int(np.prod(shape, dtype=np.int64)) * DTYPES[dt].itemsize
            if e - s != want:
                raise CheckpointError(f"{path}: tensor {k}: {e - s} bytes for shape {shape} {dt} (expected {want})")
            if e > data_len:
                raise CheckpointError(f"{path}: truncated file: tensor {k} ends at byte {self._base + e}, "
                                      f"file has {size} bytes")
            spans.append((s, e, k))
        # The tensors tile the data section exactly, as the format requires: no overlap (two names
        # reading the same bytes) and no gap (bytes no tensor owns).
        end = 0
        for s, e, k in sorted(spans):
            if s != end:
                what = "overlaps the previous tensor" if s < end else f"leaves a gap of {s - end} bytes before it"
                raise CheckpointError(f"{path}: tensor {k}: data_offsets {[s, e]} {what} (tensors must be contiguous)")
            end = e
        self._mm = None

    def keys(self):
        return list(self._header)

    def shape(self, k) -> tuple[int, ...]:
        return tuple(self._header[k]["shape"])

    def dtype(self, k) -> np.dtype:
        return DTYPES[self._header[k]["dtype"]]

    def get(self, k) -> np.ndarray:
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        info = self._header[k]
        s, e = info["data_offsets"]
        raw = self._mm[self._base + s: self._base + e]
        return raw.view(DTYPES[info["dtype"]]).reshape(info["shape"])


def write_safetensors(path: str, tensors: Iterator[tuple[str, np.ndarray]] | list, shapes: dict, dtypes: dict,
                      metadata: dict | None = None) -> None:
    """Write tensors streamed from an iterator; the header is built upfront from `shapes`/`dtypes`.

    Writes to `path + '.tmp'` then renames, so an interrupted export never leaves a half file behind.
    """
    header = {"__metadata__": metadata or {"format": "pt"}}
    off = 0
    for k, shape in shapes.items():
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtypes[k].itemsize
        header[k] = {"dtype": _NAMES[dtypes[k]], "shape": list(shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for k, arr in tensors:
            arr = np.ascontiguousarray(arr, dtype=dtypes[k])
            if arr.shape != tuple(shapes[k]):
                raise CheckpointError(f"{path}: tensor {k} has shape {arr.shape}, header says {shapes[k]}")
            f.write(arr.tobytes())
    os.replace(tmp, path)
