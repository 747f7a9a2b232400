"""Rematerialisation policies of the scanned decoder stacks (`model.remat_policy`).

What the backward pass of a layer stack keeps from its forward pass, per layer:
  none            everything autodiff saves (fastest, most memory: every intermediate of every layer)
  full            only the layer's input (the scan carry, [batch, seq, hidden]); the layer is
                  recomputed in the backward pass
  dots_saveable   the outputs of matmuls without batch dimensions, the rest recomputed
  offload_inputs  as full, but the layer inputs are kept in host memory ("pinned_host") instead of
                  device memory: copied out after each layer's forward, back before its backward
                  (the decoder-layer-input offload of MaxText's large-model recipes). Host memory
                  exists on CPU too (jax's CPU devices have a pinned_host space), so there it is a copy
                  within the same RAM: same numbers, no memory saved.
"""
from __future__ import annotations

import jax
from jax.ad_checkpoint import checkpoint_name

from dsjax.config import REMAT_POLICIES as POLICIES

LAYER_INPUT = "decoder_layer_input"


def tag_layer_input(x):
    """Name a layer's input so that a policy can save or offload it (an identity otherwise)."""
    return checkpoint_name(x, LAYER_INPUT)


def checkpoint_policy(policy: str):
    """The jax.checkpoint policy of a remat `policy` other than none (None: save nothing, i.e. only the
    checkpointed function's inputs, "full")."""
    if policy == "full":
        return None
    if policy == "dots_saveable":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    if policy == "offload_inputs":
        return jax.checkpoint_policies.save_and_offload_only_these_names(
            names_which_can_be_saved=[], names_which_can_be_offloaded=[LAYER_INPUT],
            offload_src="device", offload_dst="pinned_host")
    raise ValueError(f"remat_policy {policy!r}: expected one of {', '.join(POLICIES)}")
