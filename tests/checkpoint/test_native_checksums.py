"""A native checkpoint (dsjax convert --format native) records a checksum per array; a bit flip in its
data files fails the load with an error naming the checkpoint and the array (Orbax alone reads the
flipped file without complaint)."""
import glob
import os
import re

import jax
import numpy as np


from dsjax.checkpoint import native
from dsjax.checkpoint.safetensors_io import CheckpointError
from dsjax.model.params import init_params
from tests.checkpoint.test_bad_input import CFG


def test_bit_flip_in_a_native_checkpoint_fails_the_load_naming_it(tmp_path):
    """One bit flipped at one of five places of the largest data file, each on a fresh checkpoint: every
    load fails naming the checkpoint, or, where it hit bytes no array is read from, loads the saved
    arrays exactly. Where the flip lands inside a compressed chunk's framing, the
    storage layer's own check catches it ("checkpoint unreadable"); in array bytes that read back
    without complaint, the recorded checksums do, naming the array (the layout, and so which is which,
    varies between saves: both must occur to be told apart, and the checksum case at least once)."""
    caught_by_checksum = 0
    for k, frac in enumerate((0.5, 0.3, 0.7, 0.2, 0.8)):
        ck = tmp_path / f"ck{k}"
        native.save(init_params(CFG, 0), CFG, str(ck))
        native.load(str(ck))  # intact: loads
        files = [f for f in glob.glob(str(ck / "params" / "**" / "d" / "*"), recursive=True)]
        big = max(files, key=os.path.getsize)
        b = bytearray(open(big, "rb").read())
        b[int(len(b) * frac)] ^= 0x04
        open(big, "wb").write(bytes(b))
        try:
            loaded = native.load(str(ck))
        except CheckpointError as e:
            assert re.search(rf"ck{k}: (checksum mismatch in 1 array|checkpoint unreadable)", str(e)), e
            caught_by_checksum += "checksum mismatch in 1 array" in str(e)
        else:  # the flip hit bytes no array is read from: then every array must be exactly the saved one
            want = jax.tree.leaves(init_params(CFG, 0))
            got = jax.tree.leaves(loaded[0] if isinstance(loaded, tuple) else loaded)
            assert len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want))
    assert caught_by_checksum >= 1
