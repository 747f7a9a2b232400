"""Pallas Triton grouped matmuls for CUDA GPUs (work in progress)."""


def gmm(lhs, rhs, group_sizes, *, transpose_rhs=False, tiling=None, interpret=False):
  raise NotImplementedError("gpu.gmm: Triton kernel not written yet")


def tgmm(lhs, dout, group_sizes, *, tiling=None, interpret=False):
  raise NotImplementedError("gpu.tgmm: Triton kernel not written yet")
