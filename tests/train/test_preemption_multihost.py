"""Preemption on a pod, with two real processes joined by jax.distributed (CPU, gloo): SIGTERM reaching
one host, or every host at different moments (a Cloud TPU maintenance event signals each VM), makes
every process stop at the same step (dsjax.train.preemption: JAX's preemption sync manager).

The CI test runs PreemptionWatch in a bare loop with one collective per step (seconds); the slow test
runs `dsjax train` itself: every process saves that step, exits 0 with the line saying so, and the
rerun's rows equal an uninterrupted two-process run's bit for bit (several minutes on 2 CPU cores)."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.train.cli_util import wait_for_rows
from tests.train.multihost_util import env, finish, free_port, rows, start_two

_LOOP = """
from dsjax.parallel import distributed
distributed.maybe_initialize()
import time, numpy as np
from jax.experimental import multihost_utils
from dsjax.train.preemption import PreemptionWatch
with PreemptionWatch() as w:
    for step in range(1, 100000):
        multihost_utils.process_allgather(np.int32(step))  # the hosts run in lock step, as training does
        time.sleep(0.02)
        print(f"step {step}", flush=True)
        if w.should_stop(step):
            print(f"stop {step} signal {w.signal_received}", flush=True)
            break
"""

# (process, seconds to wait before signalling it)
ONE_HOST = [(1, 0.0)]  # the notice reaches one host only (not process 0)
EVERY_HOST = [(1, 0.0), (0, 0.3)]  # every host, at different moments (a maintenance event)


def _signal(procs, order):
    for i, delay in order:
        time.sleep(delay)
        procs[i].send_signal(signal.SIGTERM)


@pytest.mark.parametrize("order", [ONE_HOST, EVERY_HOST], ids=["one_host", "every_host"])
def test_every_host_stops_at_the_same_step(order):
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", _LOOP], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env(1, JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                                                 JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)))
             for i in range(2)]
    try:
        for p in procs:  # both are past start-up (jax.distributed joined, the sync manager running)
            while (line := p.stdout.readline()) and line.strip() != "step 3":
                pass
        _signal(procs, order)
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    stops = []
    for i, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {i}: {err[-3000:]}"
        stops += re.findall(r"stop (\d+) signal 15", out)
    assert len(stops) == 2 and stops[0] == stops[1], outs


_SAVED = re.compile(r"preempted \(signal 15\): checkpoint saved at step (\d+) in (\S+); run the same command again")


@pytest.mark.slow
def test_dsjax_train_on_two_processes_preempted_resumes_bit_exact(tmp_path):
    """SIGTERM to every host at different moments, mid-run; each process saves the agreed step and exits
    0 saying so; the rerun to K steps equals an uninterrupted two-process run of K steps bit for bit."""
    wd = tmp_path / "preempted"
    procs = start_two(wd, 100000)
    try:
        wait_for_rows(procs[0], wd, 2, timeout=600)
        _signal(procs, EVERY_HOST)
        errs = finish(procs, timeout=300)
    finally:
        for p in procs:
            p.kill()
    saved = [_SAVED.findall(e) for e in errs]
    assert all(len(s) == 1 for s in saved), errs
    (n, where), = saved[0]
    assert saved[1] == saved[0], saved  # every host names the same step and directory
    n = int(n)
    assert where == str(wd / "checkpoints") and os.listdir(wd / "checkpoints") == [str(n)]
    assert [r["step"] for r in rows(wd)] == list(range(1, n + 1))

    k = n + 2
    resumed, ref = start_two(wd, k), start_two(tmp_path / "ref", k)
    finish(resumed + ref)
    a, b = rows(tmp_path / "ref"), rows(wd)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, k + 1))
    timing = ("tokens_per_sec", "mfu")
    for x, y in zip(a, b):
        assert {key: v for key, v in x.items() if key not in timing} == \
            {key: v for key, v in y.items() if key not in timing}, (x, y)
