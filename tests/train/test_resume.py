"""Resuming a workdir: which run-config changes resume and which are refused (dsjax.train.resume), a
readable checkpoint never moved aside, unreadable ones moved aside without overwriting, bit flips caught
by the per-array checksums, torn metrics lines, and read-only commands that never write. Every case
starts from one real 4-step run (Orbax checkpoints at steps 2 and 4)."""
import glob
import os
import shutil

import numpy as np
import pytest

import dsjax
from dsjax.cli import main
from dsjax.train.checkpointing import CheckpointMismatchError
from dsjax.train.config import load_train_config
from dsjax.train.trainer import train
from tests.train.cli_util import SMALL, losses

BASE = SMALL + ["steps=4", "checkpoint_every=2", "async_checkpointing=false"]


def _cfg(*over):
    return load_train_config(None, BASE + list(over))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    wd = tmp_path_factory.mktemp("base") / "run"
    train(_cfg(), str(wd))
    return wd


@pytest.fixture
def wd(base, tmp_path):
    shutil.copytree(base, tmp_path / "run")
    return tmp_path / "run"


def _snapshot(d):
    """Every file under d with its size and mtime: what 'nothing written' means."""
    out = {}
    for root, dirs, files in os.walk(d):
        for n in dirs + files:
            p = os.path.join(root, n)
            st = os.stat(p)
            out[os.path.relpath(p, d)] = (st.st_size, st.st_mtime_ns) if n in files else "dir"
    return out


def _flip_bit(wd, step):
    """Flip one bit in the middle of the largest array data file of checkpoint `step`."""
    files = glob.glob(str(wd / "checkpoints" / str(step) / "state" / "**" / "d" / "*"), recursive=True)
    big = max(files, key=os.path.getsize)
    b = bytearray(open(big, "rb").read())
    b[len(b) // 2] ^= 0x10
    with open(big, "wb") as f:
        f.write(bytes(b))


def _garble(wd, step):
    for root, _, files in os.walk(wd / "checkpoints" / str(step) / "state"):
        for fn in files:
            with open(os.path.join(root, fn), "wb") as f:
                f.write(b"garbage")


def test_schedule_fields_resume_with_one_line_each_and_a_torn_metrics_line_is_dropped(wd, capsys):
    with open(wd / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 7.1, "grad_n')  # torn by a crash mid-write
    with pytest.warns(UserWarning, match=r"metrics.jsonl: dropped 1 unreadable line\(s\) \(line 5"):
        rows = train(_cfg("steps=6", "weight_decay=0.0", "clip_norm=0", "lr=0.002", "log_every=2"), str(wd))
    err = capsys.readouterr().err
    assert "resumed from" in err and err.count("resume: ") == 4  # log_every (free) changes silently
    assert "resume: clip_norm 1.0 -> 0.0 applies from step 5" in err
    assert "resume: weight_decay 0.1 -> 0.0 applies from step 5" in err
    assert "resume: lr 0.003 -> 0.002 applies from step 5" in err
    assert "resume: steps 4 -> 6 applies from step 5" in err
    assert [r["step"] for r in rows] == [6]
    assert sorted(losses(wd)) == [1, 2, 3, 4, 6]
    assert sorted(os.listdir(wd / "checkpoints")) == ["2", "4", "6"] and not (wd / "unreadable").exists()


@pytest.mark.parametrize("over,field,old,new", [
    ("seed=1", "seed", "0", "1"),
    ("batch_size=4", "batch_size", "8", "4"),
    ("moment_dtype=bfloat16", "moment_dtype", "'float32'", "'bfloat16'"),
    ("model.kv_lora_rank=16", "model.kv_lora_rank", "32", "16"),
    ("data.shuffle=false", "data.shuffle", "True", "False"),
])
def test_fixed_fields_are_refused_with_exit_2_and_the_workdir_untouched(wd, capsys, over, field, old, new):
    before = _snapshot(wd)
    assert main(["train", "--workdir", str(wd), *BASE, over]) == 2
    err = capsys.readouterr().err
    assert f"changed {field} ({field}: {old} in the workdir, {new} now)" in err, err
    assert _snapshot(wd) == before


def test_readable_checkpoint_of_another_state_tree_is_refused_never_moved(wd):
    """Without the run-config record (an older workdir, a hand edit) the checkpoint itself says the tree
    differs: refused, and the readable checkpoint stays where it is."""
    os.remove(wd / "run_config.yaml")
    with pytest.raises(CheckpointMismatchError, match=r"checkpoints/4: .*has dtype float32, this run expects bfloat16"
                                                     r".*left untouched"):
        train(_cfg("moment_dtype=bfloat16"), str(wd))
    assert sorted(os.listdir(wd / "checkpoints")) == ["2", "4"] and not (wd / "unreadable").exists()


def test_unreadable_checkpoints_are_moved_aside_never_over_an_earlier_copy(wd):
    for n, aside in enumerate(["4", "4.1"]):
        _garble(wd, 4)
        with pytest.warns(UserWarning, match=rf"checkpoints/4: checkpoint unreadable.*moved to .*unreadable/{aside}; "
                                             r"falling back to step 2"):
            rows = train(_cfg(), str(wd))
        assert [r["step"] for r in rows] == [3, 4]
        assert sorted(os.listdir(wd / "unreadable")) == ["4", "4.1"][:n + 1]
        assert sorted(os.listdir(wd / "checkpoints")) == ["2", "4"]


def test_bit_flip_is_caught_by_checksums_reads_fall_back_without_writing(wd, capsys):
    """A bit flip inside an array's data file: Orbax reads it without complaint; the checksum recorded
    at save time does not match. Read-only commands (from_pretrained, export, info, generate) warn and
    use step 2 and leave the workdir as it was; asking for step 4 fails naming it; training falls back."""
    _flip_bit(wd, 4)
    before = _snapshot(wd)
    with pytest.warns(UserWarning, match=r"checkpoints/4: checkpoint unreadable \(CheckpointCorruptError: checksum "
                                         r"mismatch in 1 array.*falling back to step 2"):
        model = dsjax.from_pretrained(str(wd))
    assert np.isfinite(model.logits([[1, 2, 3]])).all()
    assert main(["export", "--workdir", str(wd), "--out", str(wd.parent / "hf"), "--step", "4"]) == 2
    assert "checkpoints/4: checkpoint unreadable" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="checksum mismatch"):
        assert main(["export", "--workdir", str(wd), "--out", str(wd.parent / "hf")]) == 0
    assert main(["info", str(wd)]) == 0
    with pytest.warns(UserWarning, match="checksum mismatch"):
        assert main(["generate", "--checkpoint", str(wd), "--prompt", "ab", "--max-new-tokens", "2"]) == 0
    assert _snapshot(wd) == before  # nothing written, moved or deleted
    with pytest.warns(UserWarning, match=r"checksum mismatch.*moved to .*unreadable/4; falling back to step 2"):
        rows = train(_cfg(), str(wd))
    assert [r["step"] for r in rows] == [3, 4]
