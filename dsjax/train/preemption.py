"""Preemption: Cloud TPU spot reclaims and maintenance events send SIGTERM some seconds before the VM
goes away. The training loop asks `should_stop(step)` after every step; once it says yes, the loop
saves a checkpoint at that step and returns, and the CLI exits 0 with a line saying so.

One process (a CPU/GPU box, one TPU VM): a SIGTERM handler sets a flag; the current step finishes.
A pod (jax.distributed initialised): each host may see the signal at a different step (a maintenance
event signals every VM, not at the same moment; a notice may also reach one host only), and a checkpoint
needs every host at the same step. JAX's preemption sync manager agrees on one: `jax.distributed.
initialize` starts it (config jax_enable_preemption_service, on by default) and its notifier catches
SIGTERM itself (in C++, logging "SIGTERM caught"), so no Python handler is installed there. The first
notice on any host reaches every host through the distributed runtime's key-value store; the hosts
then take the largest step any of them has reached, plus one, as the sync point, and
`multihost_utils.reached_preemption_sync_point(step)` is true on every host at that same step. It
runs in the distributed client, not on the accelerator, so it works the same on CPU processes: with
jax 0.10.2, two CPU processes over gloo stop at one step whether SIGTERM reaches one of them or both
at different moments (tests/train/test_preemption_multihost.py, which also runs `dsjax train` so: every
host saves that step and exits 0, and the rerun equals an uninterrupted run bit for bit).
"""
from __future__ import annotations

import signal
import threading
import warnings


class PreemptionWatch:
    """`with PreemptionWatch() as w: ... if w.should_stop(step): save; break`."""

    def __init__(self):
        self.signal_received: int | None = None
        self._old = None
        self._multihost = False
        self._warned = False

    def __enter__(self):
        import jax

        self._multihost = jax.process_count() > 1
        # Handlers can only be installed from the main thread (tests may train from another one).
        if not self._multihost and threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._on_signal)
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
            self._old = None

    def _on_signal(self, signum, frame):
        self.signal_received = signum

    def should_stop(self, step: int) -> bool:
        """True when the run must save at `step` and stop (every host returns True at the same step)."""
        if self._multihost:
            from jax.experimental import multihost_utils

            try:
                reached = multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError as e:  # jax_enable_preemption_service off: no agreed step exists
                if not self._warned:
                    warnings.warn(f"preemption sync unavailable ({e}); SIGTERM will not save a checkpoint")
                    self._warned = True
                return False
            if reached:
                self.signal_received = signal.SIGTERM
            return reached
        return self.signal_received is not None
