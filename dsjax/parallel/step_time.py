"""A roofline estimate of one training step from the compiled program (see launch/README.md).

Three times per chip: compute = analytic FLOPs / (chips x bf16 peak); HBM = bytes the optimised
program reads and writes (dsjax.parallel.hlo_stats, loops unrolled) / HBM bandwidth; collectives =
ring wire bytes / link bandwidth (ICI within a slice, DCN between slices). Perfect overlap gives the
max of the three, no overlap their sum: a real step lies between (XLA overlaps the FSDP gathers with
compute; dependent all-to-alls and the HBM-bound parts of attention do not hide).
"""
from __future__ import annotations

import dataclasses

# DeepSeek-V3 technical report (arXiv:2412.19437), section 1: 180K H800 GPU hours per trillion tokens.
DEEPSEEK_V3_GPU_HOURS_PER_T_TOKENS = 180e3


@dataclasses.dataclass(frozen=True)
class StepEstimate:
    flops: float  # per step, all chips
    tokens: int  # per step
    chips: int
    peak_flops: float  # per chip
    compute_s: float
    hbm_s: float
    ici_s: float
    dcn_s: float

    @property
    def overlapped_s(self) -> float:
        return max(self.compute_s, self.hbm_s, self.ici_s + self.dcn_s)

    @property
    def serial_s(self) -> float:
        return self.compute_s + self.hbm_s + self.ici_s + self.dcn_s

    def mfu(self, seconds: float) -> float:
        return self.flops / (self.chips * self.peak_flops * seconds)

    def chip_hours_per_t_tokens(self, seconds: float) -> float:
        return seconds * self.chips / 3600 * 1e12 / self.tokens

    def lines(self) -> list[str]:
        o, s = self.overlapped_s, self.serial_s
        ms = lambda t: f"{t * 1e6:.0f} us" if t < 1e-3 else f"{t * 1e3:.1f} ms" if t < 1 else f"{t:.2f} s"  # noqa: E731
        return [
            f"estimated step time: {ms(o)} perfectly overlapped .. {ms(s)} not overlapped "
            f"(compute {ms(self.compute_s)}, HBM {ms(self.hbm_s)}, ICI {ms(self.ici_s)}, DCN {ms(self.dcn_s)})",
            f"estimated MFU: {100 * self.mfu(o):.1f}% overlapped .. {100 * self.mfu(s):.1f}% not overlapped",
            f"estimated chip-hours per trillion tokens: {self.chip_hours_per_t_tokens(o) / 1e3:.3g}K overlapped .. "
            f"{self.chip_hours_per_t_tokens(s) / 1e3:.3g}K not overlapped "
            f"(DeepSeek-V3 reports {DEEPSEEK_V3_GPU_HOURS_PER_T_TOKENS / 1e3:.0f}K H800 GPU-hours)",
        ]


def estimate(flops: float, tokens: int, chips: int, chip, hbm_bytes: float, ici_bytes: float,
             dcn_bytes: float) -> StepEstimate:
    """chip: an aot.Chip (peak_flops, hbm_bw, ici_bw, dcn_bw per chip); bytes are per chip."""
    return StepEstimate(flops, tokens, chips, chip.peak_flops, flops / (chips * chip.peak_flops),
                        hbm_bytes / chip.hbm_bw, ici_bytes / chip.ici_bw, dcn_bytes / chip.dcn_bw)
