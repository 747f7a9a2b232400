"""Inputs that used to load silently or hang: safetensors headers whose offsets are negative, out of
bounds, overlapping or leave gaps; index shard paths outside the checkpoint directory; a FIFO where a
file should be; NaN/Inf weights; a config.json of another model type or missing an architecture field;
out-of-range run fields and overrides that do not parse. Each refused with an error naming the culprit."""
import json
import os
import struct
import threading

import jax
import numpy as np
import pytest

import dsjax
from dsjax.checkpoint.safetensors_io import CheckpointError, SafetensorsFile
from dsjax.cli import main
from dsjax.config import ConfigError, load_config
from dsjax.train.config import load_train_config
from tests.checkpoint.test_bad_input import CFG, FILE, _m, _tensors, _write


def _rewrite_header(f, edit):
    """Apply `edit(header dict)` to the safetensors file's JSON header, keeping its data bytes."""
    raw = open(f, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(f, "wb") as out:
        out.write(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])


def _two(header):
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    return header[names[0]], header[names[1]], names


@pytest.mark.parametrize("edit,msg", [
    (lambda h: _two(h)[0].update(data_offsets=[-4, _two(h)[0]["data_offsets"][1] - 4]), "are not integers 0 <= begin"),
    (lambda h: _two(h)[1].update(data_offsets=[o - 4 for o in _two(h)[1]["data_offsets"]]), "overlaps the previous"),
    (lambda h: _two(h)[1].update(data_offsets=[o + 4 for o in _two(h)[1]["data_offsets"]]), "leaves a gap of 4 bytes"),
    (lambda h: _two(h)[0].update(data_offsets=[0, 10 ** 12]), "bytes for shape"),
    (lambda h: _two(h)[0].update(shape=[-1, 4]), "is not a list of non-negative integers"),
])
def test_header_offsets_are_checked(tmp_path, edit, msg):
    f = _write(tmp_path, _tensors())
    _rewrite_header(f, edit)
    with pytest.raises(CheckpointError, match=_m(f, msg)):
        SafetensorsFile(f)


def test_index_shard_path_outside_the_checkpoint_is_refused(tmp_path):
    outside = tmp_path / "elsewhere"
    _write(outside, _tensors())
    ck = tmp_path / "ck"
    _write(ck, _tensors())
    names = list(_tensors())
    for bad in ["../elsewhere/" + FILE, str(outside / FILE)]:
        with open(ck / "model.safetensors.index.json", "w") as f:
            json.dump({"weight_map": {n: bad for n in names}}, f)
        with pytest.raises(CheckpointError, match=_m("shard path", bad, "outside the checkpoint directory")):
            dsjax.from_pretrained(ck)
    os.remove(ck / FILE)
    os.symlink(outside / FILE, ck / FILE)  # a symlink out of the directory is outside too
    with open(ck / "model.safetensors.index.json", "w") as f:
        json.dump({"weight_map": {n: FILE for n in names}}, f)
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        dsjax.from_pretrained(ck)


def test_fifo_is_refused_without_blocking(tmp_path):
    _write(tmp_path, _tensors())
    os.remove(tmp_path / FILE)
    os.mkfifo(tmp_path / FILE)
    result = {}

    def load():
        try:
            dsjax.from_pretrained(tmp_path)
        except CheckpointError as e:
            result["err"] = str(e)

    t = threading.Thread(target=load, daemon=True)  # reading a FIFO with no writer would block forever
    t.start()
    t.join(60)
    assert not t.is_alive(), "the loader blocked on the FIFO"
    assert "not a regular file" in result["err"] and FILE in result["err"]


def test_nonfinite_weight_is_refused_naming_it_unless_allowed(tmp_path, capsys):
    t = _tensors()
    t["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"][1, 2] = np.nan
    _write(tmp_path, t)
    with pytest.raises(CheckpointError, match=_m(FILE, "model.layers.0.self_attn.kv_a_proj_with_mqa.weight",
                                                 "1 non-finite value")):
        dsjax.from_pretrained(tmp_path)
    assert main(["generate", "--checkpoint", str(tmp_path), "--prompt", "a", "--max-new-tokens", "1"]) == 2
    assert "kv_a_proj_with_mqa.weight holds 1 non-finite value" in capsys.readouterr().err
    m = dsjax.from_pretrained(tmp_path, allow_nonfinite=True)  # the explicit opt-out
    assert sum(int(np.isnan(np.asarray(x)).sum()) for x in jax.tree.leaves(m.params)) == 1


def test_config_json_unknown_model_type_and_missing_fields(tmp_path):
    d = CFG.to_hf_dict()
    (tmp_path / "config.json").write_text(json.dumps(dict(d, model_type="llama")))
    with pytest.raises(ConfigError, match=_m("config.json", "model_type 'llama'", "deepseek_v3")):
        load_config(tmp_path)
    for missing in ["kv_lora_rank", "num_hidden_layers", "moe_intermediate_size"]:
        (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in d.items() if k != missing}))
        with pytest.raises(ConfigError, match=_m("config.json", "missing architecture field", missing)):
            load_config(tmp_path)


@pytest.mark.parametrize("over,msg", [
    ("lr=-0.1", "'lr': must be a finite number >= 0, got -0.1"),
    ("lr=.nan", "'lr': must be a finite number >= 0, got nan"),
    ("b2=1.5", "'b2': must be a finite number >= 0 and < 1"),
    ("eps=0", "'eps': must be a finite number > 0"),
    ("weight_decay=-1", "'weight_decay': must be a finite number >= 0"),
    ("warmup_steps=-5", "'warmup_steps': must be an integer >= 0"),
    ("steps=-1", "'steps': must be a positive integer"),
    ("lr=abc", "'lr': expected a number, got 'abc'"),
    ("lr=[", "override 'lr': cannot parse value '['"),
    ("progress=maybe", "'progress': must be true or false"),
    ("model.rope_theta=abc", "'rope_theta': expected a finite float, got 'abc'"),
])
def test_run_fields_range_checked_and_bad_overrides_name_the_key(tmp_path, capsys, over, msg):
    with pytest.raises(ConfigError, match=_m(msg)):
        load_train_config(None, [over])
    assert main(["train", "--workdir", str(tmp_path / "w"), over]) == 2
    assert msg in capsys.readouterr().err
    assert not (tmp_path / "w").exists()  # refused before anything is written
