"""The roofline step-time estimate (dsjax.parallel.step_time) on numbers worked by hand."""
import types

import pytest

from dsjax.parallel import step_time


def test_estimate_by_hand():
    chip = types.SimpleNamespace(peak_flops=1e12, hbm_bw=1e9, ici_bw=2e9, dcn_bw=1e8)
    # 2 chips, 4e12 FLOPs -> 2 s compute; 3e9 HBM bytes -> 3 s; 2e9 ICI -> 1 s; 1e8 DCN -> 1 s
    e = step_time.estimate(4e12, tokens=1000, chips=2, chip=chip, hbm_bytes=3e9, ici_bytes=2e9, dcn_bytes=1e8)
    assert (e.compute_s, e.hbm_s, e.ici_s, e.dcn_s) == pytest.approx((2, 3, 1, 1))
    assert e.overlapped_s == pytest.approx(3) and e.serial_s == pytest.approx(7)
    assert e.mfu(3) == pytest.approx(2 / 3) and e.mfu(7) == pytest.approx(2 / 7)
    # 3 s x 2 chips per 1000 tokens = 1/600 chip-hours per 1000 tokens -> 1e12 / 1000 / 600 per T tokens
    assert e.chip_hours_per_t_tokens(3) == pytest.approx(1e9 / 600)
    lines = e.lines()
    assert lines[0].startswith("estimated step time: 3.00 s perfectly overlapped .. 7.00 s not overlapped")
    assert lines[1] == "estimated MFU: 66.7% overlapped .. 28.6% not overlapped"
    assert "DeepSeek-V3 reports 180K H800 GPU-hours" in lines[2]
