"""One trainer per workdir: a lock file WORKDIR/.lock holding its holder's record {host, pid, start,
token} (token: random, so a holder recognises its own record).

The lock is created with workdir_io.create_exclusive, which exactly one process wins: O_CREAT | O_EXCL
on a local (or POSIX-mounted, e.g. gcsfuse) workdir, GCS's create-only-if-absent precondition
(ifGenerationMatch=0, through gcsfs) on gs://. A second trainer finds the record and stops with an
error naming the holder. The winner reads its record back and checks the token (a store without a
server-side precondition, such as fsspec's file://, only checks then writes: the read-back catches most
such races, not all).

A lock left behind by a holder that died (kill -9, OOM) is stale when its host is this host and its pid
no longer runs (a crashed other host is not detectable: see below); it is taken over by moving it to a
name unique to the taker and creating a fresh lock again. Locally the move is an atomic rename, so of two
takers only one gets it. On an object store a move is copy + delete, so the takeover is best effort:
two trainers started on the same host in the same instant after a crash could both take it over. A lock
held by another host is never broken automatically: the error names it and the file to delete once that
host is known to be gone.

On a pod only process 0 takes the lock (all hosts of one run share the workdir); the others learn its
verdict from a broadcast (hold_workdir). A dead holder's pid reused by a new process errs on the safe
side: the lock is kept and the error names that pid.

Tested on local directories and through the URL path with fsspec's in-memory file system (the code
gs:// runs through), not against a real bucket.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import time
import warnings

from dsjax.config import ConfigError
from dsjax.train import workdir_io

LOCK_NAME = ".lock"


class WorkdirLockedError(ConfigError):
    """Another live process holds the workdir."""


def _record() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "token": secrets.token_hex(8)}


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
        return json.loads(workdir_io.read_bytes(path))
    except (OSError, ValueError):
        return None


class WorkdirLock:
    """Context manager: `with WorkdirLock(workdir): ...` (acquire() / release() for explicit use)."""

    def __init__(self, workdir: str, *, enabled: bool = True):
        self.workdir = workdir
        self.path = workdir_io.join(workdir, LOCK_NAME)
        self.enabled = enabled
        self._token = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()

    def acquire(self) -> None:
        if not self.enabled:
            return
        rec = _record()
        for _ in range(3):  # a stale lock is taken over at most once or twice (another taker may race us)
            if workdir_io.create_exclusive(self.path, json.dumps(rec)):
                mine = _read(self.path)
                if mine is None or mine.get("token") != rec["token"]:  # lost a race on a store without O_EXCL
                    raise WorkdirLockedError(_describe(self.path, mine))
                self._token = rec["token"]
                return
            holder = _read(self.path)
            if holder is None:
                time.sleep(0.2)  # the holder may be between create and write: read it again
                holder = _read(self.path)
            if not self._stale(holder):
                raise WorkdirLockedError(_describe(self.path, holder))
            # Stale: move it away (locally atomic: of two takers exactly one succeeds), then create again.
            aside = f"{self.path}.stale.{rec['host']}.{rec['pid']}"
            try:
                workdir_io.move(self.path, aside)
            except FileNotFoundError:
                continue  # someone else took it over first; compete for the fresh lock
            taken = _read(aside)
            if taken != holder:  # we moved a lock made after our check: a live holder; give it back
                workdir_io.move(aside, self.path)
                raise WorkdirLockedError(_describe(self.path, taken))
            workdir_io.remove(aside)
            warnings.warn(f"{self.path}: took over a stale lock of host {holder.get('host')} pid "
                          f"{holder.get('pid')} (that process no longer runs)")
        raise WorkdirLockedError(_describe(self.path, _read(self.path)))

    @staticmethod
    def _stale(holder: dict | None) -> bool:
        if not holder or holder.get("host") != socket.gethostname():
            return False  # another host's lock (or unreadable): never broken automatically
        pid = holder.get("pid")
        return isinstance(pid, int) and pid != os.getpid() and not _pid_alive(pid)

    def release(self) -> None:
        """Delete the lock if it is still this holder's record."""
        if self._token is None:
            return
        token, self._token = self._token, None
        try:
            if (_read(self.path) or {}).get("token") == token:
                workdir_io.remove(self.path)
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
