"""MLA attention kernels: public entry points and backend dispatch.

    mla_attention(q, k, v, *, segment_ids=None, sm_scale=None, causal=True, impl="auto",
                  interpret=False, block_sizes=None) -> o
        q, k [batch, seq, heads, qk_dim], v [batch, seq, heads, v_dim] (qk_dim may differ from
        v_dim, e.g. 192 vs 128), segment_ids [batch, seq] int32 (attend only within a segment,
        causal within it). Returns [batch, seq, heads, v_dim] in q.dtype. sm_scale defaults to
        qk_dim**-0.5. Differentiable in q, k, v through a custom_vjp whose backward runs its own
        kernels (dq and dk/dv) from the saved log-sum-exp; nothing differentiates the forward kernel.

    mla_decode(q_latent, q_pe, latent_cache, rope_cache, lengths, *, sm_scale, page_table=None,
               impl="auto", interpret=False, num_splits=None, block_t=None) -> o_latent
        Absorbed decode (DeepSeek-V2 paper, MLA): q_latent [batch, heads, kv_lora_rank] (= q_nope @ W_UK),
        q_pe [batch, heads, rope_dim], lengths [batch] int32 (valid cache entries; length 0 gives
        zeros). Contiguous caches: latent_cache [batch, cache_len, kv_lora_rank], rope_cache
        [batch, cache_len, rope_dim]. Paged caches: [num_pages, page_size, dim] with page_table
        [batch, pages_per_seq] int32 (page i of a sequence holds its tokens
        i*page_size .. (i+1)*page_size-1). score_t = sm_scale * (q_latent.c_t + q_pe.kpe_t), masked
        to t < lengths[b], softmax over t, o_latent = sum_t p_t c_t (apply W_UV^T outside).
        Split-KV: the cache is cut into num_splits ranges, each kernel program keeps its own
        softmax statistics and the splits are merged in XLA via their log-sum-exps.

impl: "auto" = the Pallas kernel of the platform the computation is lowered for (TPU: tpu.py,
CUDA: gpu.py) and the pure-jnp reference elsewhere, chosen with lax.platform_dependent so that AOT
lowering for a TPU topology from a CPU host gets the TPU kernel; "pallas" = the kernel of the
platform lowered for, never the reference (lowering for CPU raises PallasUnavailableError unless
interpret=True, where the TPU kernel runs in the Pallas interpreter); "pallas_tpu" / "pallas_gpu" = that backend's kernel explicitly (AOT
compiles, interpreter tests); "xla" = reference.py.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.mla import gpu, reference, tpu
from pallas_kernels.unavailable import unavailable

IMPLS = ("auto", "pallas", "pallas_tpu", "pallas_gpu", "xla")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Sequence tiles of the attention kernels (forward, and backward dq / dk-dv)."""

    block_q: int = 256
    block_k: int = 256
    block_q_bwd: int = 256
    block_k_bwd: int = 256


# GPU tiles measured on an H200 (benchmarks/mla_kernels.py --blocks, b2 s4096 h16 qk192 v128 bf16):
# 128 x 64 forward and 64 x 64 backward tiles ran forward + backward in 4.9 ms against 9.1 ms for
# 64 x 64 / 32 x 32; 128 x 128 overflows the 227 KiB of shared memory. float32 tiles take twice the
# shared memory, so they stay at the smaller set.
DEFAULT_BLOCKS = {"tpu": BlockSizes(), "gpu": BlockSizes(128, 64, 64, 64)}
GPU_F32_BLOCKS = BlockSizes(64, 64, 32, 32)


def default_blocks(backend, dtype):
    if backend == "gpu" and jnp.dtype(dtype).itemsize > 2:
        return GPU_F32_BLOCKS
    return DEFAULT_BLOCKS[backend]


@dataclasses.dataclass(frozen=True)
class _Cfg:
    backend: str  # "tpu" | "gpu"
    sm_scale: float
    causal: bool
    blocks: BlockSizes
    interpret: bool


def _round_up(x, m):
    return -(-x // m) * m


def _tiles(seq, block_q, block_k, backend):
    """Clamp blocks to the (padded) sequence and pad the sequence to a multiple of both."""
    if backend == "gpu":  # Triton tiles are powers of two, at least 16 rows for tl.dot.
        cap = max(16, 1 << (seq - 1).bit_length())
    else:  # Mosaic: 16 rows keep bf16 (16, 128) tiles whole.
        cap = _round_up(seq, 16)
    bq, bk = min(block_q, cap), min(block_k, cap)
    return bq, bk, _round_up(seq, max(bq, bk))


def _to_kernel_layout(x, seq_pad):
    """[b, s, h, d] -> [b, h, s_pad, d] (zero padded)."""
    x = jnp.swapaxes(x, 1, 2)
    return jnp.pad(x, ((0, 0), (0, 0), (0, seq_pad - x.shape[2]), (0, 0)))


def _from_kernel_layout(x, seq):
    return jnp.swapaxes(x[:, :, :seq], 1, 2)


def _module(backend):
    return tpu if backend == "tpu" else gpu


def _seg_args(segment_ids, seq_pad, backend):
    if segment_ids is None:
        return None, None
    seg = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, seq_pad - segment_ids.shape[1])))
    if backend == "tpu":
        return seg[:, :, None], seg[:, None, :]  # [b, s, 1] rows, [b, 1, s] lanes
    return seg, seg


def _fwd_impl(q, k, v, segment_ids, cfg):
    seq = q.shape[1]
    bq, bk, seq_pad = _tiles(seq, cfg.blocks.block_q, cfg.blocks.block_k, cfg.backend)
    qt, kt, vt = (_to_kernel_layout(x, seq_pad) for x in (q, k, v))
    q_seg, kv_seg = _seg_args(segment_ids, seq_pad, cfg.backend)
    kv_len = seq if seq_pad != seq else None
    o, lse = _module(cfg.backend).flash_fwd(
        qt, kt, vt, q_seg, kv_seg, sm_scale=cfg.sm_scale, causal=cfg.causal, kv_len=kv_len,
        block_q=bq, block_k=bk, interpret=cfg.interpret)
    return _from_kernel_layout(o, seq), (o, lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, segment_ids, cfg):
    return _fwd_impl(q, k, v, segment_ids, cfg)[0]


def _flash_fwd(q, k, v, segment_ids, cfg):
    out, (o_kernel, lse) = _fwd_impl(q, k, v, segment_ids, cfg)
    return out, (q, k, v, segment_ids, o_kernel, lse)


def _flash_bwd(cfg, res, do):
    q, k, v, segment_ids, o, lse = res
    seq = q.shape[1]
    bq, bk, seq_pad = _tiles(seq, cfg.blocks.block_q_bwd, cfg.blocks.block_k_bwd, cfg.backend)
    if seq_pad != o.shape[2]:  # forward and backward tiles padded differently
        # Padded query rows are zero, so their lse may be anything finite (here 0).
        o, lse = (jnp.pad(x[:, :, :seq], ((0, 0), (0, 0), (0, seq_pad - seq), (0, 0)))
                  for x in (o, lse))
    qt, kt, vt, dot = (_to_kernel_layout(x, seq_pad) for x in (q, k, v, do))
    # delta_i = sum_d o_id * do_id = sum_j p_ij dp_ij: the softmax-backward row term, [b,h,s,1].
    delta = jnp.sum(o.astype(jnp.float32) * dot.astype(jnp.float32), axis=-1, keepdims=True)
    q_seg, kv_seg = _seg_args(segment_ids, seq_pad, cfg.backend)
    kv_len = seq if seq_pad != seq else None
    dq, dk, dv = _module(cfg.backend).flash_bwd(
        qt, kt, vt, q_seg, kv_seg, lse, delta, dot.astype(v.dtype), sm_scale=cfg.sm_scale,
        causal=cfg.causal, kv_len=kv_len, block_q=bq, block_k=bk, interpret=cfg.interpret)
    grads = tuple(_from_kernel_layout(g, seq) for g in (dq, dk, dv))
    return grads + (None,)


_flash.defvjp(_flash_fwd, _flash_bwd)


def _dispatch(impl, interpret, kernel_fn, ref_fn, args, what):
    """Pick the backend for `impl` (see module docstring); kernel_fn(backend, *args)."""
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r}: expected one of {IMPLS}")
    if impl == "xla":
        return ref_fn(*args)
    if impl in ("pallas_tpu", "pallas_gpu"):
        return kernel_fn(impl.removeprefix("pallas_"), *args)
    if interpret:  # "auto"/"pallas" in the interpreter: the Mosaic kernels
        return kernel_fn("tpu", *args)
    default = ref_fn
    if impl == "pallas":  # never the reference: lowering for CPU raises (pallas_kernels/unavailable.py)
        def default(*a):
            out = jax.eval_shape(ref_fn, *a)
            return unavailable(a[0], out.shape, out.dtype, what)
    return lax.platform_dependent(
        *args, tpu=functools.partial(kernel_fn, "tpu"), cuda=functools.partial(kernel_fn, "gpu"),
        default=default)


def mla_attention(q, k, v, *, segment_ids=None, sm_scale=None, causal=True, impl="auto",
                  interpret=False, block_sizes=None):
    """Flash attention with qk_dim != v_dim; see the module docstring for the contract."""
    if q.shape != k.shape or q.shape[:3] != v.shape[:3]:
        raise ValueError(f"mla_attention: q {q.shape}, k {k.shape}, v {v.shape} must share "
                         f"[batch, seq, heads] and q, k their qk_dim")
    if segment_ids is not None and segment_ids.shape != q.shape[:2]:
        raise ValueError(f"mla_attention: segment_ids {segment_ids.shape} != [batch, seq] "
                         f"{q.shape[:2]}")
    sm_scale = float(q.shape[-1] ** -0.5 if sm_scale is None else sm_scale)

    def kernel_fn(backend, q, k, v, segment_ids):
        cfg = _Cfg(backend, sm_scale, bool(causal), block_sizes or default_blocks(backend, q.dtype),
                   bool(interpret))
        return _flash(q, k, v, segment_ids, cfg)

    def ref_fn(q, k, v, segment_ids):
        return reference.mla_attention(q, k, v, segment_ids=segment_ids, sm_scale=sm_scale,
                                       causal=causal)

    return _dispatch(impl, interpret, kernel_fn, ref_fn, (q, k, v, segment_ids), "mla_attention")


def combine_splits(o_parts, lse_parts):
    """Merge split-KV partials: o [b, splits, h, r] (normalised per split), lse [b, splits, h, 1]."""
    lse_max = jnp.max(lse_parts, axis=1, keepdims=True)
    lse_max = jnp.where(jnp.isfinite(lse_max), lse_max, 0.0)
    w = jnp.exp(lse_parts - lse_max)  # empty splits: exp(-inf) = 0
    total = jnp.sum(w, axis=1)
    o = jnp.sum(w * o_parts, axis=1) / jnp.where(total == 0.0, 1.0, total)
    return o  # [b, h, r]


def default_num_splits(backend, batch, n_blocks):
    """Enough (batch x split) programs to fill the chip: 132 SMs on H100, 1-2 cores on TPU."""
    target = 132 if backend == "gpu" else 2
    return max(1, min(n_blocks, -(-target // batch)))


def mla_decode(q_latent, q_pe, latent_cache, rope_cache, lengths, *, sm_scale, page_table=None,
               impl="auto", interpret=False, num_splits=None, block_t=None):
    """Absorbed MLA decode over a contiguous or paged latent cache; see the module docstring."""
    b, h, r = q_latent.shape
    if q_pe.shape[:2] != (b, h) or latent_cache.shape[-1] != r:
        raise ValueError(f"mla_decode: q_latent {q_latent.shape}, q_pe {q_pe.shape}, "
                         f"latent_cache {latent_cache.shape} disagree on batch/heads/rank")
    if page_table is None and latent_cache.shape[0] != b:
        raise ValueError(f"mla_decode: contiguous cache batch {latent_cache.shape[0]} != {b}")
    sm_scale = float(sm_scale)

    def kernel_fn(backend, q_latent, q_pe, latent_cache, rope_cache, lengths, page_table):
        # GPU: 128-token cache tiles read 1.34x faster than 64 on an H200 (bf16); 256 overflows
        # shared memory, and float32 halves what fits.
        bt = block_t or (256 if backend == "tpu" else 128 if latent_cache.dtype.itemsize <= 2 else 64)
        if page_table is None:
            n_blocks = -(-latent_cache.shape[1] // min(bt, latent_cache.shape[1]))
        else:
            n_blocks = page_table.shape[1]
        splits = num_splits or default_num_splits(backend, b, n_blocks)
        splits = max(1, min(splits, n_blocks))
        o_parts, lse_parts = _module(backend).decode_partials(
            q_latent, q_pe, latent_cache, rope_cache, lengths, page_table, sm_scale=sm_scale,
            num_splits=splits, block_t=bt, interpret=interpret)
        return combine_splits(o_parts, lse_parts).astype(q_latent.dtype)

    def ref_fn(q_latent, q_pe, latent_cache, rope_cache, lengths, page_table):
        return reference.mla_decode(q_latent, q_pe, latent_cache, rope_cache, lengths,
                                    sm_scale=sm_scale, page_table=page_table)

    return _dispatch(impl, interpret, kernel_fn, ref_fn,
                     (q_latent, q_pe, latent_cache, rope_cache, lengths, page_table), "mla_decode")
