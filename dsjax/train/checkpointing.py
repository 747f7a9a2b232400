"""Training checkpoints with Orbax: state (params, optimiser, step, RNG — the balancing biases are
params) plus the data iterator's state, async saves, keep-last-K, and atomic commits (Orbax writes to a
temporary directory and renames it when complete, so a save killed midway never becomes "latest").
A latest checkpoint that fails to restore falls back to the previous one with a warning; the unreadable
one is moved aside to DIR/unreadable/STEP (kept for inspection, and out of the way of the resumed run's
own save of that step)."""
from __future__ import annotations

import base64
import json
import os
import shutil
import warnings

import jax
import orbax.checkpoint as ocp


def _jsonable(data_state):
    if isinstance(data_state, (bytes, bytearray)):
        return {"__bytes__": base64.b64encode(bytes(data_state)).decode()}
    json.dumps(data_state)  # fail here, loudly, rather than inside the async writer
    return data_state


def _from_jsonable(d):
    if isinstance(d, dict) and set(d) == {"__bytes__"}:
        return base64.b64decode(d["__bytes__"])
    return d


class Checkpointer:
    def __init__(self, directory: str, *, keep: int, async_save: bool):
        self.directory = os.path.abspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        opts = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                            create=True)
        self.mngr = ocp.CheckpointManager(self.directory, options=opts, item_names=("state", "data"))

    def save(self, step: int, state, data_state) -> None:
        self.mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     data=ocp.args.JsonSave(_jsonable(data_state))), force=True)

    def steps(self) -> list[int]:
        return sorted(self.mngr.all_steps())

    def restore(self, abstract_state, step: int | None = None):
        """(step, state, data_state) of the newest restorable checkpoint (or `step`), or None."""
        steps = [step] if step is not None else sorted(self.steps(), reverse=True)
        bad = []
        try:
            for i, s in enumerate(steps):
                try:
                    r = self.mngr.restore(s, args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
                    return s, r.state, _from_jsonable(r.data)
                except Exception as e:  # noqa: BLE001 — any unreadable checkpoint: try the previous one
                    if step is not None:
                        raise
                    bad.append(s)
                    later = steps[i + 1] if i + 1 < len(steps) else None
                    warnings.warn(f"{self.directory}/{s}: checkpoint unreadable ({type(e).__name__}: "
                                  f"{str(e)[:200]}); moved to {self._aside_dir()}/{s}; "
                                  + (f"falling back to step {later}" if later is not None else "starting from scratch"))
            return None
        finally:
            if bad:
                self._move_aside(bad)

    def _aside_dir(self) -> str:
        return os.path.join(os.path.dirname(self.directory), "unreadable")

    def _move_aside(self, steps: list[int]) -> None:
        if jax.process_index() == 0:
            aside = self._aside_dir()
            os.makedirs(aside, exist_ok=True)
            for s in steps:
                dest = os.path.join(aside, str(s))
                if os.path.exists(dest):
                    shutil.rmtree(dest)
                shutil.move(os.path.join(self.directory, str(s)), dest)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("dsjax_checkpoint_move_aside")
        self.mngr.reload()

    def wait(self):
        self.mngr.wait_until_finished()

    def close(self):
        self.mngr.wait_until_finished()
        self.mngr.close()


def abstract_of(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)), tree)
