"""The errors a user can cause. The CLI prints their message (which names the file, key or value) and
exits 2 instead of showing a traceback."""
import errno

from dsjax.checkpoint.safetensors_io import CheckpointError
from dsjax.config import ConfigError


class DataError(ValueError):
    """An input data file is missing, unreadable, empty or malformed."""


class StorageError(OSError):
    """A path cannot be written: disk full, read-only file system, no permission, or a file where a
    directory must be. The message names the path and the cause."""

    def __str__(self):
        return self.strerror or super().__str__()


# errno values that are the user's storage, not a bug: reported as one line naming the path and cause.
_CAUSES = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
           errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
           errno.EPERM: "operation not permitted", errno.ENOTDIR: "a path component is a file, not a directory",
           errno.EEXIST: "exists and is a file, not a directory", errno.EISDIR: "is a directory"}
_WRAPPED = (errno.ENOSPC, errno.EROFS, errno.EDQUOT)  # found by their message when wrapped by a library


def storage_error(e: BaseException | None, path: str | None = None) -> StorageError | None:
    """A StorageError for `e` when it (or an exception it wraps, e.g. inside Orbax or TensorStore, which
    keep only the message) is a storage failure; else None."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, StorageError):
            return e
        code = getattr(e, "errno", None)
        if code not in _CAUSES:
            text = str(e).lower()
            code = next((c for c in _WRAPPED if _CAUSES[c] in text), None)
        if code is not None:
            where = getattr(e, "filename", None) or path or "?"
            return StorageError(code, f"{where}: cannot write: {_CAUSES[code]}")
        e = e.__cause__ or e.__context__
    return None


UserError = (ConfigError, CheckpointError, DataError, FileNotFoundError, StorageError)
