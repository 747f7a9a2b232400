"""A native checkpoint (dsjax convert --format native) records a checksum per array; a bit flip in its
data files fails the load with an error naming the checkpoint and the array (Orbax alone reads the
flipped file without complaint)."""
import glob
import os

import pytest

from dsjax.checkpoint import native
from dsjax.checkpoint.safetensors_io import CheckpointError
from dsjax.model.params import init_params
from tests.checkpoint.test_bad_input import CFG


def test_bit_flip_in_a_native_checkpoint_fails_the_load_naming_it(tmp_path):
    native.save(init_params(CFG, 0), CFG, str(tmp_path / "ck"))
    native.load(str(tmp_path / "ck"))  # intact: loads
    files = [f for f in glob.glob(str(tmp_path / "ck" / "params" / "**" / "d" / "*"), recursive=True)]
    big = max(files, key=os.path.getsize)
    b = bytearray(open(big, "rb").read())
    b[len(b) // 2] ^= 0x04
    open(big, "wb").write(bytes(b))
    with pytest.raises(CheckpointError, match=r"ck: checksum mismatch in 1 array"):
        native.load(str(tmp_path / "ck"))
