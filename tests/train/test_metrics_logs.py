"""The run logs on resume: metrics.jsonl keeps the rows up to the resumed step and drops torn lines
(with a warning naming the file and line); the TensorBoard file of the resumed run carries a purge at
the resumed step, so TensorBoard drops the interrupted run's later points."""
import glob
import json
import os
import struct

import pytest

from dsjax.train.metrics import MetricsLogger, trim_jsonl


def test_trim_keeps_rows_to_the_step_and_drops_torn_lines(tmp_path):
    p = tmp_path / "metrics.jsonl"
    rows = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 7)]
    p.write_text("\n".join(rows[:3]) + "\n\x00\x00garbage\n" + "\n".join(rows[3:]) + '\n{"step": 7, "lo')
    with pytest.warns(UserWarning, match=r"metrics.jsonl: dropped 2 unreadable line\(s\) \(line 4, 8"):
        trim_jsonl(str(p), 5)
    assert [json.loads(x)["step"] for x in p.read_text().splitlines()] == [1, 2, 3, 4, 5]
    assert not os.path.exists(str(p) + ".tmp")


def _events(path):
    """Event protos of a TensorBoard file (TFRecord framing: length, crc, data, crc)."""
    from tensorboardX.proto import event_pb2

    out, raw = [], open(path, "rb").read()
    i = 0
    while i < len(raw):
        (n,) = struct.unpack("<Q", raw[i:i + 8])
        ev = event_pb2.Event()
        ev.ParseFromString(raw[i + 12:i + 12 + n])
        out.append(ev)
        i += 12 + n + 4
    return out


def test_resumed_tensorboard_file_purges_from_the_resumed_step(tmp_path):
    pytest.importorskip("tensorboardX")
    first = MetricsLogger(str(tmp_path), 0)
    for s in range(1, 7):
        first.log({"step": s, "loss": float(s)})
    first.close()
    files = set(glob.glob(str(tmp_path / "tensorboard" / "*")))
    again = MetricsLogger(str(tmp_path), 4)
    again.log({"step": 5, "loss": 0.5})
    again.close()
    (new,) = set(glob.glob(str(tmp_path / "tensorboard" / "*"))) - files
    starts = [e.step for e in _events(new) if e.HasField("session_log") and e.session_log.status == 1]
    assert starts == [5]  # SessionLog.START at step 5: TensorBoard discards earlier files' steps >= 5
