"""Every file the training code keeps in a workdir (run_config.yaml, metrics.jsonl, the lock, a
distillation's data and stats, the checkpoint directory's bookkeeping) is read and written here, so a
workdir is a local directory or an object-store URL alike: `gs://bucket/run` on a pod (every host must
see the same files), or any other fsspec URL (`memory://`, `file://`: how the tests drive this path).

  local path   plain os calls. A whole-file write goes to a temporary file renamed over the target
               (os.replace: a reader, or a crash, sees the old file or the new one, never half of it);
               appends are appends; create_exclusive is O_CREAT | O_EXCL; move is an atomic rename.
  URL          fsspec (gs:// through gcsfs >= 2024.12, the backend etils.epath, and so Orbax's own
               metadata, use for gs:// when TensorFlow is absent). A whole-object write is atomic by
               itself (an object appears whole or not at all). Objects cannot be appended to: an
               AppendLog keeps the object's text and rewrites it whole, at most every `flush_seconds`
               and on flush(). create_exclusive passes mode="create", which gcsfs turns into GCS's
               precondition ifGenerationMatch=0 (the server refuses the write if the object exists).
               move is copy + delete: not atomic. There are no directories: makedirs does nothing.

Untested against a real bucket (none is reachable where the tests run): the URL path is tested with
fsspec's in-memory and local filesystems, which share every line of this module with gs://.
"""
from __future__ import annotations

import os
import time

from dsjax.config import ConfigError


def is_url(path: str) -> bool:
    return "://" in str(path)


def join(base: str, *names: str) -> str:
    if is_url(base):
        return "/".join([str(base).rstrip("/"), *names])
    return os.path.join(base, *names)


def local_path(path: str) -> str | None:
    """The local file system path of `path` (file:// URLs included), or None on an object store."""
    path = str(path)
    if path.startswith("file://"):
        return path[len("file://"):]
    return None if is_url(path) else os.path.abspath(path)


def orbax_path(path: str) -> str:
    """`path` as Orbax (etils.epath) takes it: local paths absolute, gs:// and other URLs as they are."""
    return local_path(path) or str(path)


def _fs(path: str):
    """(fsspec filesystem, path within it) of a URL; a missing backend is a ConfigError naming it."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(path)
    except ImportError as e:
        raise ConfigError(f"{path}: this URL's file system needs a package that is not installed ({e}); "
                          "for gs:// install gcsfs>=2024.12 (pip install 'dsjax[tpu]')") from None


def exists(path: str) -> bool:
    if not is_url(path):
        return os.path.exists(path)
    fs, p = _fs(path)
    return fs.exists(p)


def isdir(path: str) -> bool:
    if not is_url(path):
        return os.path.isdir(path)
    fs, p = _fs(path)
    return fs.isdir(p)


def makedirs(path: str) -> None:
    if not is_url(path):
        os.makedirs(path, exist_ok=True)
    elif local_path(path):
        os.makedirs(local_path(path), exist_ok=True)  # (file:// has real directories)


def read_bytes(path: str) -> bytes:
    if not is_url(path):
        with open(path, "rb") as f:
            return f.read()
    fs, p = _fs(path)
    return fs.cat_file(p)


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def write_atomic(path: str, data: str | bytes) -> None:
    """Replace `path`'s content with `data`: readers (and a crash) see the old content or the new."""
    data = data.encode("utf-8") if isinstance(data, str) else data
    if not is_url(path):
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    fs, p = _fs(path)
    fs.pipe_file(p, data)


def create_exclusive(path: str, data: str) -> bool:
    """Create `path` holding `data` if no such file exists: True if this call created it, False if it
    existed (of several concurrent callers exactly one gets True: O_EXCL locally, ifGenerationMatch=0 on
    GCS; an fsspec backend without a server-side precondition, e.g. file://, checks then writes)."""
    if not is_url(path):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(data)
        return True
    fs, p = _fs(path)
    try:
        fs.pipe_file(p, data.encode("utf-8"), mode="create")
    except FileExistsError:
        return False
    except TypeError as e:  # an fsspec backend older than mode="create" (gcsfs < 2024.12)
        raise ConfigError(f"{path}: {type(fs).__name__} cannot create a file only if it is absent ({e}); "
                          "upgrade it (gcsfs>=2024.12)") from None
    return True


def remove(path: str) -> None:
    """Delete the file `path`; FileNotFoundError if it does not exist."""
    if not is_url(path):
        os.remove(path)
        return
    fs, p = _fs(path)
    if not fs.exists(p):
        raise FileNotFoundError(path)
    fs.rm_file(p)


def move(src: str, dst: str) -> None:
    """Move the file or directory `src` to `dst` (locally an atomic rename; on an object store copy then
    delete); FileNotFoundError if `src` does not exist."""
    if not is_url(src):
        os.rename(src, dst)
        return
    fs, p = _fs(src)
    if not fs.exists(p):
        raise FileNotFoundError(src)
    fs.mv(p, _fs(dst)[1], recursive=True)


class AppendLog:
    """A text file grown one record at a time (metrics.jsonl). Locally each append is a write to the
    file opened for appending, as soon as it is made. On an object store the object is rewritten whole
    (write_atomic) with everything appended so far, at most every `flush_seconds` and on flush()/close():
    a crash loses at most that many seconds of records (the trainer flushes before each checkpoint, so
    no record up to a checkpoint is lost)."""

    def __init__(self, path: str, flush_seconds: float = 30.0):
        self.path = path
        self.flush_seconds = flush_seconds
        self._remote = is_url(path)
        self._text: list[str] = []  # (object store) the object's content, then the appended records
        self._dirty = False
        self._last = time.monotonic()
        if self._remote and exists(path):
            self._text.append(read_text(path))

    def append(self, text: str) -> None:
        if not self._remote:
            with open(self.path, "a") as f:
                f.write(text)
            return
        self._text.append(text)
        self._dirty = True
        if time.monotonic() - self._last >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        if self._remote and self._dirty:
            write_atomic(self.path, "".join(self._text))
            self._dirty = False
            self._last = time.monotonic()

    def close(self) -> None:
        self.flush()
