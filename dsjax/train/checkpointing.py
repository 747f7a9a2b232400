"""Training checkpoints with Orbax: state (params, optimiser, step, RNG — the balancing biases are
params) plus the data iterator's state and a checksum per array, async saves, keep-last-K, and atomic
commits (Orbax writes to a temporary directory and renames it when complete, so a save killed midway
never becomes "latest").

Restoring tells two failures apart:
  * the checkpoint is readable but holds another state tree than this run builds (other model or
    optimiser structure): CheckpointMismatchError (the CLI exits 2); the checkpoint is left untouched;
  * the checkpoint cannot be read, or an array's checksum differs from the one recorded at save time
    (a bit flip): the previous checkpoint is tried, with a warning. A trainer (never a read-only
    command) moves the unreadable one to DIR/../unreadable/STEP (STEP.1, ... if that name is taken:
    earlier moved-aside copies are never overwritten), out of the way of its own save of that step.
Asking for one `step` that is unreadable is an error naming it.
"""
from __future__ import annotations

import base64
import json
import logging
import sys
import traceback
import warnings

import jax
import orbax.checkpoint as ocp

from dsjax.checkpoint.safetensors_io import CheckpointError
from dsjax.config import ConfigError
from dsjax.errors import storage_error
from dsjax.checkpoint import checksums
from dsjax.train import workdir_io


class CheckpointMismatchError(ConfigError):
    """A readable checkpoint whose state tree differs from the one this run config builds."""


class CheckpointCorruptError(CheckpointError):
    """A checkpoint that cannot be read or fails its checksums."""


def _jsonable(data_state):
    if isinstance(data_state, (bytes, bytearray)):
        return {"__bytes__": base64.b64encode(bytes(data_state)).decode()}
    json.dumps(data_state)  # fail here, loudly, rather than inside the async writer
    return data_state


def _from_jsonable(d):
    if isinstance(d, dict) and set(d) == {"__bytes__"}:
        return base64.b64decode(d["__bytes__"])
    return d


class _QuietStorageErrors(logging.Filter):
    """Drop Orbax's error logs (with tracebacks, from its writer threads) for a full or read-only disk:
    the same failure reaches the trainer as an exception and is reported once, as one line naming the
    path and the cause (dsjax.errors.StorageError)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:  # (and the notes Orbax logs for every read-only manager)
            return not record.getMessage().startswith(("Given directory is read only", "CheckpointManagerOptions.read_only"))
        exc = record.exc_info[1] if record.exc_info else None
        return storage_error(exc) is None and storage_error(RuntimeError(record.getMessage())) is None


_quiet = _QuietStorageErrors()
logging.getLogger("absl").addFilter(_quiet)
logging.getLogger("asyncio").addFilter(_quiet)  # "Task exception was never retrieved" of the failed writes


def _late_callback(exc_type, exc, tb) -> bool:
    """A TensorStore completion calling back into the asyncio loop Orbax already closed after a failed
    save: raised once per pending write in TensorStore's threads, which report it through
    sys.unraisablehook (or sys.excepthook), interleaved with the run's own output."""
    if exc_type is not RuntimeError or str(exc) != "Event loop is closed":
        return False
    names = [f.f_code.co_name for f, _ in traceback.walk_tb(tb)]
    return names[:1] == ["call_soon_threadsafe"] and names[-1:] == ["_check_closed"]


def _excepthook(exc_type, exc, tb, _chained=sys.excepthook):
    if not _late_callback(exc_type, exc, tb):
        _chained(exc_type, exc, tb)


def _unraisablehook(unraisable, _chained=sys.unraisablehook):
    if not _late_callback(unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback):
        _chained(unraisable)


sys.excepthook = _excepthook
sys.unraisablehook = _unraisablehook

_HANDLERS = {"state": ocp.StandardCheckpointHandler, "data": ocp.JsonCheckpointHandler,
             "checksums": ocp.JsonCheckpointHandler}


class Checkpointer:
    def __init__(self, directory: str, *, keep: int, async_save: bool, read_only: bool = False):
        self.directory = workdir_io.orbax_path(directory)  # (local: absolute; gs://: as is)
        self.read_only = read_only
        if not read_only:
            workdir_io.makedirs(self.directory)
        opts = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                            create=not read_only, read_only=read_only)
        self.mngr = ocp.CheckpointManager(self.directory, options=opts,
                                          item_handlers={k: h() for k, h in _HANDLERS.items()})

    def save(self, step: int, state, data_state) -> None:
        try:
            self.mngr.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(_jsonable(data_state)),
                checksums=ocp.args.JsonSave(checksums.checksums(state))), force=True)
        except Exception as e:  # noqa: BLE001 — a full or read-only disk is the user's, not a bug
            raise storage_error(e, self.directory) or e

    def steps(self) -> list[int]:
        return sorted(self.mngr.all_steps())

    def restore(self, abstract_state, step: int | None = None):
        """(step, state, data_state) of the newest restorable checkpoint (or of `step`), or None."""
        if step is not None and step not in self.steps():
            raise CheckpointError(f"{self.directory}: no checkpoint at step {step} (steps: {self.steps()})")
        steps = [step] if step is not None else sorted(self.steps(), reverse=True)
        bad = []
        try:
            for i, s in enumerate(steps):
                where = f"{self.directory}/{s}"
                try:
                    return s, *self._restore_one(s, abstract_state)
                except CheckpointMismatchError:
                    raise
                except Exception as e:  # noqa: BLE001 — any unreadable checkpoint: try the previous one
                    msg = f"{where}: checkpoint unreadable ({type(e).__name__}: {str(e)[:300]})"
                    if step is not None:
                        raise CheckpointCorruptError(msg) from None
                    bad.append(s)
                    later = steps[i + 1] if i + 1 < len(steps) else None
                    aside = "" if self.read_only else f"; moved to {self._aside_path(s)}"
                    then = (f"falling back to step {later}" if later is not None
                            else "no earlier checkpoint" + ("" if self.read_only else ": starting from scratch"))
                    warnings.warn(f"{msg}{aside}; {then}")
            return None
        finally:
            if bad and not self.read_only:
                self._move_aside(bad)

    def _restore_one(self, s: int, abstract_state):
        problem = self._tree_mismatch(s, abstract_state)
        if problem:
            raise CheckpointMismatchError(
                f"{self.directory}/{s}: the checkpoint holds another state tree than this run config builds "
                f"({problem}); it is left untouched. Resume with the run config it was written with "
                "(run_config.yaml), or use a new --workdir")
        items = dict(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
        has_sums = workdir_io.isdir(workdir_io.join(self.directory, str(s), "checksums"))
        if has_sums:
            items["checksums"] = ocp.args.JsonRestore()
        r = self.mngr.restore(s, args=ocp.args.Composite(**items))
        if has_sums:
            bad = checksums.mismatches(r.state, r.checksums)
            if bad:
                raise CheckpointCorruptError(f"checksum mismatch in {len(bad)} array(s), e.g. {bad[:3]} "
                                             "(the data files changed after the save)")
        return r.state, _from_jsonable(r.data)

    def _tree_mismatch(self, s: int, abstract_state) -> str | None:
        """What differs between checkpoint `s`'s saved array tree and `abstract_state`; None if they
        agree. Unreadable metadata raises (the checkpoint is then unreadable, not mismatched)."""
        saved = self.mngr.item_metadata(s)["state"]
        if saved is None:
            raise CheckpointCorruptError("no readable state metadata")
        have = {checksums.leaf_name(p): m for p, m in jax.tree_util.tree_leaves_with_path(saved)}
        want = {checksums.leaf_name(p): a for p, a in jax.tree_util.tree_leaves_with_path(abstract_state)}
        missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
        if missing or extra:
            return (f"{len(missing)} array(s) missing, e.g. {missing[:2]}; "
                    f"{len(extra)} not in this run, e.g. {extra[:2]}")
        for k, a in want.items():
            if tuple(have[k].shape) != tuple(a.shape):
                return f"array {k} has shape {tuple(have[k].shape)}, this run expects {tuple(a.shape)}"
            if str(have[k].dtype) != str(a.dtype):
                return f"array {k} has dtype {have[k].dtype}, this run expects {a.dtype}"
        return None

    def _aside_path(self, s: int) -> str:
        """DIR/../unreadable/STEP, or STEP.1, STEP.2, ... : never an existing name."""
        base = workdir_io.join(self.directory.rstrip("/").rsplit("/", 1)[0], "unreadable", str(s))
        dest, n = base, 0
        while workdir_io.exists(dest):
            n += 1
            dest = f"{base}.{n}"
        return dest

    def _move_aside(self, steps: list[int]) -> None:
        if jax.process_index() == 0:
            for s in steps:
                dest = self._aside_path(s)
                workdir_io.makedirs(dest.rsplit("/", 1)[0])
                workdir_io.move(workdir_io.join(self.directory, str(s)), dest)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("dsjax_checkpoint_move_aside")
        self.mngr.reload()

    def wait(self):
        try:
            self.mngr.wait_until_finished()
        except Exception as e:  # noqa: BLE001 — an async save that hit a full or read-only disk
            raise storage_error(e, self.directory) or e

    def close(self):
        self.wait()
        try:
            self.mngr.close()
        except Exception as e:  # noqa: BLE001 — as in wait: a failed async save surfacing at close
            raise storage_error(e, self.directory) or e


def abstract_of(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)), tree)
