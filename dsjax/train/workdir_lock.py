"""One trainer per workdir: a lock file WORKDIR/.lock holding its holder's record.

Local (and any POSIX-mounted) workdir: the lock is created with O_CREAT | O_EXCL, which exactly one
process wins, and holds a JSON record {host, pid, start}. A second trainer finds it and stops with an
error naming the holder. A lock left behind by a holder that died (kill -9, OOM, a crashed host is not
detectable: see below) is stale when its host is this host and its pid no longer runs; it is taken over
by renaming it to a name unique to the taker (rename is atomic, so of two takers only one gets it) and
then creating a fresh lock with O_EXCL again. A lock held by another host is never broken automatically:
the error names it and the file to delete once that host is known to be gone.

gs:// workdir: the same record is written as the object WORKDIR/.lock with the precondition
`if_generation_match=0` (create only if absent) when google-cloud-storage is importable; a second
trainer's create fails with 412 and reads the holder from the object. Without that client a gs://
workdir is not locked, and a warning says so. (Untested here: no bucket is reachable from CI. The trainer
also writes run_config.yaml and metrics.jsonl with local file calls today, so a gs:// workdir needs those
as object writes too before it runs; a gcsfuse-mounted bucket is a local path and takes the local lock.)

On a pod only process 0 takes the lock (all hosts of one run share the workdir); the others learn its
verdict from a broadcast (hold_workdir). A dead holder's pid reused by a new process errs on the safe
side: the lock is kept and the error names that pid.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import warnings

from dsjax.config import ConfigError

LOCK_NAME = ".lock"


class WorkdirLockedError(ConfigError):
    """Another live process holds the workdir."""


def _record() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _describe(path: str, rec: dict | None) -> str:
    if not rec:
        return (f"{path}: workdir is locked by another trainer (the lock record is unreadable); "
                f"if no trainer uses this workdir, delete {path}")
    other_host = rec.get("host") != socket.gethostname()
    return (f"{path}: workdir is in use by another trainer (host {rec.get('host')}, pid {rec.get('pid')}, "
            f"started {rec.get('start')}); wait for it to finish, or stop it, or use another --workdir"
            + (f" (if that host is gone, delete {path})" if other_host else ""))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _read(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


class WorkdirLock:
    """Context manager: `with WorkdirLock(workdir): ...` (acquire() / release() for explicit use)."""

    def __init__(self, workdir: str, *, enabled: bool = True):
        self.workdir = workdir
        self.path = workdir.rstrip("/") + "/" + LOCK_NAME if workdir.startswith("gs://") else os.path.join(workdir, LOCK_NAME)
        self.enabled = enabled
        self._held = False
        self._gcs_blob = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()

    def acquire(self) -> None:
        if not self.enabled:
            return
        if self.workdir.startswith("gs://"):
            self._acquire_gcs()
        else:
            self._acquire_local()

    def _acquire_local(self) -> None:
        rec = _record()
        for _ in range(3):  # a stale lock is taken over at most once or twice (another taker may race us)
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read(self.path)
                if holder is None:
                    time.sleep(0.2)  # the holder may be between create and write: read it again
                    holder = _read(self.path)
                if not self._stale(holder):
                    raise WorkdirLockedError(_describe(self.path, holder)) from None
                # Stale: rename it away (atomic: of two takers exactly one succeeds), then create again.
                aside = f"{self.path}.stale.{rec['host']}.{rec['pid']}"
                try:
                    os.rename(self.path, aside)
                except FileNotFoundError:
                    continue  # someone else took it over first; compete for the fresh lock
                taken = _read(aside)
                if taken != holder:  # we moved a lock made after our check: a live holder; give it back
                    os.rename(aside, self.path)
                    raise WorkdirLockedError(_describe(self.path, taken)) from None
                os.remove(aside)
                warnings.warn(f"{self.path}: took over a stale lock of host {holder.get('host')} pid "
                              f"{holder.get('pid')} (that process no longer runs)")
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(rec, f)
            self._held = True
            return
        raise WorkdirLockedError(_describe(self.path, _read(self.path)))

    @staticmethod
    def _stale(holder: dict | None) -> bool:
        if not holder or holder.get("host") != socket.gethostname():
            return False  # another host's lock (or unreadable): never broken automatically
        pid = holder.get("pid")
        return isinstance(pid, int) and pid != os.getpid() and not _pid_alive(pid)

    def _acquire_gcs(self) -> None:
        try:
            from google.api_core import exceptions as gexc
            from google.cloud import storage
        except ImportError:
            warnings.warn(f"{self.workdir}: google-cloud-storage is not installed, so this gs:// workdir is not "
                          "locked: make sure no other trainer uses it")
            return
        bucket, _, name = self.path[len("gs://"):].partition("/")
        blob = storage.Client().bucket(bucket).blob(name)
        try:
            blob.upload_from_string(json.dumps(_record()), if_generation_match=0)
        except gexc.PreconditionFailed:
            try:
                holder = json.loads(blob.download_as_text())
            except Exception:  # noqa: BLE001 — the record is informative only
                holder = None
            raise WorkdirLockedError(_describe(self.path, holder)) from None
        self._gcs_blob = blob
        self._held = True

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        if self._gcs_blob is not None:
            self._gcs_blob.delete()
            return
        try:
            if (_read(self.path) or {}).get("pid") == os.getpid():
                os.remove(self.path)
        except OSError:
            pass


@contextlib.contextmanager
def hold_workdir(workdir: str):
    """Hold `workdir`'s lock for the body. On a pod process 0 takes it and every process learns the
    outcome (all raise WorkdirLockedError if it is held elsewhere)."""
    import jax

    lock = WorkdirLock(workdir, enabled=jax.process_index() == 0)
    err = None
    try:
        lock.acquire()
    except WorkdirLockedError as e:
        err = e
    if jax.process_count() > 1:
        import numpy as np
        from jax.experimental import multihost_utils

        held_elsewhere = bool(multihost_utils.broadcast_one_to_all(np.int32(err is not None)))
        if held_elsewhere and err is None:
            err = WorkdirLockedError(f"{lock.path}: workdir is in use by another trainer (process 0 found its lock)")
    if err is not None:
        raise err
    try:
        yield lock
    finally:
        lock.release()
