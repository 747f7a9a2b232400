"""A full disk, a read-only workdir and an output path that is a file: `dsjax` exits 2 with one line
naming the path and the cause, and the checkpoints written before stay intact and restorable. The disk
is a real small tmpfs mounted by the test (skipped only where mounting is not permitted)."""
import os
import subprocess

import pytest

from dsjax.api import load_train_workdir
from tests.train.cli_util import run_cli, train_cmd, env


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=9m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


# TensorStore completions of the cancelled writes calling into Orbax's closed asyncio loop: printed from
# C now and then, interleaved with other output (most are filtered in dsjax.train.checkpointing); not
# ours, and nothing of the run is lost. Their lines are set aside; any other traceback line remains.
_LATE = ("Traceback (most recent call last):", "RuntimeError: Event loop is closed", "    self._check_closed()",
         "    raise RuntimeError('Event loop is closed')")


def _one_error_line(stderr: str, *needles: str) -> None:
    stderr = "\n".join(ln for ln in stderr.splitlines()
                       if ln not in _LATE and not (ln.startswith('  File "') and "asyncio/base_events.py" in ln))
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert not any(ln.startswith(("Traceback", "  File")) for ln in lines) and len(lines) <= 3, stderr[-3000:]
    assert any(all(n in ln for n in needles) and ln.startswith("dsjax ") for ln in lines), stderr[-3000:]


def test_disk_full_then_read_only_then_out_is_a_file(small_disk, tmp_path):
    wd = small_disk / "run"
    # Each checkpoint of this model takes ~4 MB: the third save cannot fit on the 9 MB disk.
    r = subprocess.run(train_cmd(wd, "steps=8", "checkpoint_every=1", "keep_checkpoints=100"), capture_output=True,
                       text=True, env=env(), timeout=300)
    assert r.returncode == 2
    # Whichever write meets the full disk first (a checkpoint's or metrics.jsonl's) is the one named.
    _one_error_line(r.stderr, f"{wd}/", "cannot write: no space left on device")
    steps = sorted(int(d) for d in os.listdir(wd / "checkpoints") if d.isdigit())
    assert steps and steps[-1] < 8
    for s in steps:  # every committed checkpoint restores and passes its checksums
        load_train_workdir(str(wd), step=s)

    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    r = subprocess.run(train_cmd(wd, "steps=8", "checkpoint_every=1", "keep_checkpoints=100"), capture_output=True,
                       text=True, env=env(), timeout=300)
    assert r.returncode == 2
    _one_error_line(r.stderr, str(wd), "read-only file system")

    # Reading a read-only workdir works; an --out that is a file is refused naming it.
    out_file = tmp_path / "out.txt"
    out_file.write_text("not a directory")
    r = run_cli("export", "--workdir", wd, "--out", out_file)
    assert r.returncode == 2
    _one_error_line(r.stderr, str(out_file), "exists and is a file")
    r = run_cli("export", "--workdir", wd, "--out", tmp_path / "hf")
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(int(d) for d in os.listdir(wd / "checkpoints") if d.isdigit()) == steps


def test_workdir_or_out_that_is_a_file_exits_2_naming_it(tmp_path, capsys):
    from dsjax.cli import main

    f = tmp_path / "file"
    f.write_text("x")
    assert main(["train", "--workdir", str(f), "steps=1"]) == 2
    assert f"{f}: cannot write: exists and is a file, not a directory" in capsys.readouterr().err
    assert main(["train", "--workdir", str(f / "sub"), "steps=1"]) == 2
    assert "cannot write: a path component is a file, not a directory" in capsys.readouterr().err
