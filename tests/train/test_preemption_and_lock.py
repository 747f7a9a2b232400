"""Preemption (SIGTERM) and one-trainer-per-workdir, with real `dsjax train` subprocesses and signals."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from dsjax.train.config import load_train_config
from dsjax.train.trainer import train
from dsjax.train.workdir_lock import WorkdirLock, WorkdirLockedError
from tests.train.cli_util import SMALL, env, losses, start, train_cmd, wait_for_rows

# A schedule that does not depend on `steps` (warm-up, then constant): the run stopped by SIGTERM can
# be finished with steps=K and compared bit for bit with an uninterrupted run of K steps.
FLAT = ["warmup_steps=2", "decay_start_fraction=1.0", "decay_end_fraction=1.0", "checkpoint_every=1000"]


def test_sigterm_saves_the_step_and_resume_is_bit_exact_and_second_trainer_is_refused(tmp_path):
    wd = tmp_path / "run"
    proc = start(train_cmd(wd, "steps=100000", *FLAT))
    wait_for_rows(proc, wd, 3)
    lock = json.loads((wd / ".lock").read_text())
    assert lock["pid"] == proc.pid and lock["host"] == socket.gethostname()

    # A second trainer on the same workdir exits 2 at once, naming the holder; it writes nothing.
    t = time.time()
    r = subprocess.run(train_cmd(wd, "steps=100000", *FLAT), capture_output=True, text=True, env=env(), timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"pid {proc.pid}" in r.stderr and socket.gethostname() in r.stderr and "in use" in r.stderr
    assert time.time() - t < 60
    assert proc.poll() is None  # the first one is unharmed

    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    stopped = max(losses(wd))
    assert f"checkpoint saved at step {stopped}" in err and "preempted" in err
    assert os.listdir(wd / "checkpoints") == [str(stopped)]
    assert not (wd / ".lock").exists()

    # Running again resumes exactly: losses equal an uninterrupted run bit for bit.
    k = stopped + 3
    cfg = load_train_config(None, SMALL + [f"steps={k}", *FLAT])
    rows = train(cfg, str(wd))
    assert [r["step"] for r in rows] == [stopped + 1, stopped + 2, stopped + 3]
    ref = train(cfg, str(tmp_path / "ref"))
    a, b = losses(tmp_path / "ref"), losses(wd)
    assert sorted(b) == list(range(1, k + 1)) and len(ref) == k
    assert all(a[s] == b[s] for s in a), [(s, a[s], b[s]) for s in a if a[s] != b[s]]


_HOLD = "import sys, time; from dsjax.train.workdir_lock import WorkdirLock; WorkdirLock(sys.argv[1]).acquire(); " \
        "print('held', flush=True); time.sleep(600)"
_TAKE = "import sys, warnings; from dsjax.train.workdir_lock import WorkdirLock, WorkdirLockedError\n" \
        "warnings.simplefilter('ignore')\n" \
        "try:\n    WorkdirLock(sys.argv[1]).acquire(); print('won')\nexcept WorkdirLockedError:\n    print('lost')"


def _hold(workdir):
    p = subprocess.Popen([sys.executable, "-c", _HOLD, str(workdir)], env=env(), stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_lock_of_a_killed_trainer_is_taken_over_once(tmp_path):
    holder = _hold(tmp_path)
    with pytest.raises(WorkdirLockedError, match=f"pid {holder.pid}"):
        WorkdirLock(str(tmp_path)).acquire()
    holder.kill()  # SIGKILL: the lock file stays behind
    holder.wait()
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == holder.pid
    # Four processes race for the stale lock: exactly one wins.
    racers = [subprocess.Popen([sys.executable, "-c", _TAKE, str(tmp_path)], env=env(), stdout=subprocess.PIPE,
                               text=True) for _ in range(4)]
    results = sorted(p.communicate(timeout=120)[0].strip() for p in racers)
    assert results == ["lost", "lost", "lost", "won"], results
    winner = json.loads((tmp_path / ".lock").read_text())["pid"]
    assert winner in [p.pid for p in racers]
    # The winner exited without releasing: its lock is stale too, and this process takes it with a warning.
    lock = WorkdirLock(str(tmp_path))
    with pytest.warns(UserWarning, match=f"took over a stale lock of host .* pid {winner}"):
        lock.acquire()
    lock.release()
    assert not (tmp_path / ".lock").exists()
