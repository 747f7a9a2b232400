"""Multi-host training with two real processes on this machine (tests/train/multihost_util.py). `dsjax
train` there gives the losses of the same run in one process on 8 devices (fp32, rtol 1e-5), including
after resuming from the checkpoint both processes wrote together (each host's data position restored)."""
import os

import numpy as np

from tests.train.multihost_util import env, rows, train, two_processes


def test_two_processes_equal_one_process_and_resume(tmp_path):
    one = tmp_path / "one"
    ref = train(one, 4, env(8))
    try:
        two = tmp_path / "two"
        two_processes(two, 3)
        assert sorted(os.listdir(two / "checkpoints")) == ["3"]
        two_processes(two, 4)  # resumes from the checkpoint at step 3 on both processes
        _, err = ref.communicate(timeout=600)
    finally:
        ref.kill()
    assert ref.returncode == 0, err[-3000:]
    a, b = rows(one), rows(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], rtol=1e-5)
    np.testing.assert_allclose(b[-1]["eval_loss"], a[-1]["eval_loss"], rtol=1e-5)
    assert b[-1]["loss"] < b[0]["loss"]
