"""tokamax (a maintained Pallas kernel library, `pip install -e ".[bench]"`) as the peer the kernel
benchmarks compare with: benchmarks/moe_kernels.py (ragged_dot) and mla_kernels.py (attention)."""


def load_tokamax():
    """The tokamax module, or None (with a line saying so) when it is not installed. tokamax reads its
    settings from absl flags, which would otherwise parse the benchmark's own command line and stop at
    its first option; they are marked parsed with their defaults."""
    try:
        import tokamax
    except ImportError:
        print("tokamax is not installed: no tokamax comparison (pip install -e \".[bench]\")")
        return None
    from absl import flags

    flags.FLAGS.mark_as_parsed()
    return tokamax
