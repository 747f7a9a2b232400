"""Pallas kernels for dsjax (one folder per op; each has reference.py, tpu.py, gpu.py)."""
