"""Workdir files on a URL (dsjax.train.workdir_io): the code path a gs:// workdir takes, driven here
through fsspec's in-memory file system (memory://) and its local one (file://), since no bucket is
reachable from the tests. The lock, metrics.jsonl's trimming and buffered appends, and a whole training
run that is interrupted and resumed on a file:// workdir, compared bit for bit with a local run."""
import importlib.util
import json
import os
import socket
import subprocess
import sys
import uuid

import numpy as np
import pytest

import dsjax
from dsjax.checkpoint import native
from dsjax.cli import main as cli
from dsjax.config import ConfigError
from dsjax.rl.plot import plot_grpo
from dsjax.rl.sft import load_policy
from dsjax.train import workdir_io as io
from dsjax.train.config import load_train_config
from dsjax.train.metrics import trim_jsonl
from dsjax.train.trainer import train
from dsjax.train.workdir_lock import WorkdirLock, WorkdirLockedError
from tests.train.cli_util import SMALL, losses


@pytest.fixture
def mem():
    """A fresh directory of the process's in-memory fsspec file system."""
    return f"memory://wd-{uuid.uuid4().hex}"


def test_create_exclusive_write_move_remove(mem, tmp_path):
    for base in (mem, str(tmp_path), "file://" + str(tmp_path / "url")):
        io.makedirs(base)
        p = io.join(base, "f")
        assert io.create_exclusive(p, "one") and not io.create_exclusive(p, "two")
        assert io.read_text(p) == "one"
        io.write_atomic(p, "three")
        assert io.read_text(p) == "three" and not io.exists(p + ".tmp")
        io.move(p, p + ".moved")
        assert not io.exists(p) and io.read_text(p + ".moved") == "three"
        io.remove(p + ".moved")
        with pytest.raises(FileNotFoundError):
            io.remove(p)
        with pytest.raises(FileNotFoundError):
            io.move(p, p + ".x")


def test_append_log_on_an_object_store_flushes_on_time_and_on_flush(mem):
    p = io.join(mem, "metrics.jsonl")
    io.write_atomic(p, "0\n")
    log = io.AppendLog(p, flush_seconds=3600)
    log.append("1\n")
    log.append("2\n")
    assert io.read_text(p) == "0\n"  # buffered: an object is rewritten whole, not once per row
    log.flush()
    assert io.read_text(p) == "0\n1\n2\n"
    log.flush_seconds = 0  # every append past the interval rewrites the object
    log.append("3\n")
    assert io.read_text(p) == "0\n1\n2\n3\n"
    log.append("4\n")
    log.close()
    assert io.read_text(p) == "0\n1\n2\n3\n4\n"


def test_trim_on_an_object_store_drops_torn_lines_and_later_rows(mem):
    p = io.join(mem, "metrics.jsonl")
    rows = [json.dumps({"step": s}) for s in range(1, 5)]
    io.write_atomic(p, "\n".join(rows) + '\n{"step": 5, "lo')
    with pytest.warns(UserWarning, match=r"metrics.jsonl: dropped 1 unreadable line\(s\) \(line 5"):
        trim_jsonl(p, 3)
    assert [json.loads(x)["step"] for x in io.read_text(p).splitlines()] == [1, 2, 3]


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_lock_on_an_object_store(mem):
    lock = WorkdirLock(mem)
    lock.acquire()
    rec = json.loads(io.read_text(io.join(mem, ".lock")))
    assert rec["host"] == socket.gethostname() and rec["token"]
    with pytest.raises(WorkdirLockedError, match=f"host {socket.gethostname()}, pid {rec['pid']}"):
        WorkdirLock(mem).acquire()
    lock.release()
    assert not io.exists(io.join(mem, ".lock"))

    # A lock of this host whose process is gone is taken over, with a warning naming it.
    dead = _dead_pid()
    io.write_atomic(io.join(mem, ".lock"), json.dumps({"host": socket.gethostname(), "pid": dead, "token": "x"}))
    taker = WorkdirLock(mem)
    with pytest.warns(UserWarning, match=f"took over a stale lock of host .* pid {dead}"):
        taker.acquire()
    assert json.loads(io.read_text(io.join(mem, ".lock")))["token"] != "x"
    # Release deletes only the holder's own record (here replaced behind its back).
    io.write_atomic(io.join(mem, ".lock"), json.dumps({"host": "other", "pid": 1, "token": "y"}))
    taker.release()
    assert json.loads(io.read_text(io.join(mem, ".lock")))["token"] == "y"
    # Another host's lock is never broken: the error says which file to delete once that host is gone.
    with pytest.raises(WorkdirLockedError, match=f"host other, pid 1.*delete {mem}/.lock"):
        WorkdirLock(mem).acquire()


@pytest.mark.skipif(importlib.util.find_spec("gcsfs") is not None, reason="gcsfs is installed: it would call GCS")
def test_gs_without_gcsfs_is_a_config_error_naming_it():
    with pytest.raises(ConfigError, match="gs://no-bucket/run/.lock: .*gcsfs>=2024.12"):
        WorkdirLock("gs://no-bucket/run").acquire()


def test_training_on_a_url_workdir_stops_and_resumes(tmp_path):
    """file:// takes the URL path for every workdir file (Orbax gets the local directory, as it gets gs://
    itself): a run stopped at step 2, whose metrics.jsonl then gains a row past the checkpoint and a torn
    line, resumes to step 3 (the rows past the checkpoint and the torn line are dropped, the lock is
    released). Bit-exact resumption itself is tested on local workdirs (test_preemption_and_lock.py)."""
    over = SMALL + ["checkpoint_every=1000", "async_checkpointing=false", "eval_batches=1"]
    url = "file://" + str(tmp_path / "url")
    train(load_train_config(None, over + ["steps=3"]), url, stop_after=2)
    metrics = io.join(url, "metrics.jsonl")
    assert [json.loads(x)["step"] for x in io.read_text(metrics).splitlines()] == [1, 2]
    assert "steps: 3" in io.read_text(io.join(url, "run_config.yaml"))
    assert sorted(os.listdir(tmp_path / "url" / "checkpoints")) == ["2"]
    first = losses(tmp_path / "url")
    io.write_atomic(metrics, io.read_text(metrics) + json.dumps({"step": 3, "loss": 0.0}) + '\n{"step": 4, "lo')
    with pytest.warns(UserWarning, match="metrics.jsonl: dropped 1 unreadable line"):
        rows = train(load_train_config(None, over + ["steps=3"]), url)
    assert [r["step"] for r in rows] == [3]
    after = losses(tmp_path / "url")
    assert sorted(after) == [1, 2, 3] and after[1] == first[1] and after[2] == first[2] and 0.0 < after[3] < first[1]
    assert not io.exists(io.join(url, ".lock"))
    _read_only_commands_on_a_url_workdir(url, tmp_path)


def _files(root):
    """{relative path: (size, mtime_ns)} of every file under root."""
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            st = os.stat(os.path.join(d, n))
            out[os.path.relpath(os.path.join(d, n), root)] = (st.st_size, st.st_mtime_ns)
    return out


def _same_params(a, b):
    import jax

    la, lb = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (p, x), (_, y) in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(p))


def _read_only_commands_on_a_url_workdir(url, tmp_path):
    """from_pretrained, info and export read a URL workdir as they read the local one, writing nothing in
    it; a post-training run's final model (WORKDIR/final) is saved to and loaded from a URL."""
    local = url[len("file://"):]
    before = _files(local)
    model = dsjax.from_pretrained(url)
    _same_params(model.params, dsjax.from_pretrained(local).params)
    assert cli(["info", url]) == 0
    assert cli(["export", "--workdir", url, "--out", str(tmp_path / "hf")]) == 0
    _same_params(dsjax.from_pretrained(str(tmp_path / "hf")).params, model.params)
    assert _files(local) == before  # nothing written, moved or touched
    post = "file://" + str(tmp_path / "post")
    native.save(model.params, model.config, io.join(post, "final"))
    assert native.is_native(io.join(post, "final")) and not native.is_native(post)
    _same_params(load_policy(post).params, model.params)
    assert load_policy(post).config == model.config


def test_grpo_plot_reads_and_writes_urls(mem):
    pytest.importorskip("matplotlib")
    rows = [{"step": s, "reward": 0.1 * s, "accuracy": 0.05 * s, "response_length": 10 + s, "kl": 0.01 * s}
            for s in range(1, 6)]
    io.write_atomic(io.join(mem, "metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "re')
    assert plot_grpo(io.join(mem, "metrics.jsonl"), io.join(mem, "grpo.png")) == io.join(mem, "grpo.png")
    assert io.read_bytes(io.join(mem, "grpo.png")).startswith(b"\x89PNG")
