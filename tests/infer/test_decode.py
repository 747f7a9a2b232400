"""The latent cache: prefill + absorbed decode reproduce the full forward (the model core, itself checked
against HF transformers) at every step, batched with different prompt lengths."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsjax
from dsjax.infer import cache as cache_lib
from dsjax.infer.decode import extend, mtp_extend, mtp_prefill, prefill
from tests.infer.conftest import TINY

TOL = dict(rtol=1e-5, atol=1e-5)
LENS = np.array([3, 7, 5], np.int32)  # right-padded prompts of different lengths
STEPS = 6
P = int(LENS.max())
MAX_LEN = P + STEPS


@functools.lru_cache(maxsize=None)
def _fns(cfg):
    return dict(
        forward=jax.jit(lambda p, t: dsjax.forward(p, t, cfg)),
        prefill=jax.jit(lambda p, t, c: prefill(p, t, c, cfg)),
        extend=jax.jit(lambda p, t, c: extend(p, t, c, cfg)),
        extend_kernel=jax.jit(lambda p, t, c: extend(p, t, c, cfg, decode_impl="xla")),
        mtp_prefill=jax.jit(lambda p, h, t, c: mtp_prefill(p, h, t, c, cfg)),
        mtp_extend=jax.jit(lambda p, h, t, c: mtp_extend(p, h, t, c, cfg)),
    )


@pytest.fixture(scope="module")
def setup(tiny_model):
    params, cfg = tiny_model.params, tiny_model.config
    seqs = np.random.default_rng(1).integers(3, cfg.vocab_size, (3, MAX_LEN)).astype(np.int32)
    logits, aux = _fns(cfg)["forward"](params, seqs)  # the oracle: no cache, non-absorbed MLA
    prompt = np.where(np.arange(P)[None] < LENS[:, None], seqs[:, :P], 0)
    cache = cache_lib.init_cache(cfg, 3, MAX_LEN, with_mtp=True)
    pre_logits, h, cache = _fns(cfg)["prefill"](params, prompt, cache)
    return dict(params=params, cfg=cfg, seqs=seqs, ref=np.asarray(logits), ref_mtp=np.asarray(aux["mtp_logits"][0]),
                pre_logits=np.asarray(pre_logits), h=h, cache=dict(cache, lengths=jnp.asarray(LENS)))


def test_cache_holds_only_latent_and_rope_key():
    c = cache_lib.init_cache(TINY, batch=2, max_len=10, with_mtp=True)
    assert c["moe"]["c"].shape == (2, 2, 10, TINY.kv_lora_rank)
    assert c["moe"]["k_pe"].shape == (2, 2, 10, TINY.qk_rope_head_dim)
    assert c["dense"]["c"].shape[0] == 1 and c["mtp"]["c"].shape[0] == 1
    v3 = dsjax.load_config("configs/deepseek_v3_671b.yaml")
    # MLA as in the DeepSeek-V2 paper: 576 numbers per token per layer vs 128 x (192 + 128) = 40,960 for plain MHA.
    assert cache_lib.numbers_per_token(v3) == 576 and cache_lib.mha_numbers_per_token(v3) == 40960


def test_cached_decode_matches_full_forward(setup):
    """Prompts of lengths 3/7/5, then 6 teacher-forced single-token steps: every step's logits equal the
    full forward's logits at that position, per sequence."""
    s = setup
    for i, n in enumerate(LENS):
        np.testing.assert_allclose(s["pre_logits"][i, :n], s["ref"][i, :n], **TOL)
    step = _fns(s["cfg"])["extend"]
    cache, bi = s["cache"], np.arange(3)
    for k in range(STEPS):
        pos = LENS + k
        logits, _, cache = step(s["params"], s["seqs"][bi, pos][:, None], cache)
        np.testing.assert_allclose(np.asarray(logits[:, 0]), s["ref"][bi, pos], **TOL, err_msg=f"step {k}")
        cache = dict(cache, lengths=cache["lengths"] + 1)
    assert step._cache_size() == 1  # one compilation serves every step


@pytest.mark.slow  # the same T = 2 pass is exercised by test_speculative_equals_greedy
def test_multi_token_extend_matches_forward(setup):
    """T = 2 new tokens at once (the speculative verify) from per-sequence offsets 3/2/5."""
    s = setup
    start = np.array([3, 2, 5], np.int32)
    toks = np.stack([s["seqs"][i, a:a + 2] for i, a in enumerate(start)])
    logits, _, _ = _fns(s["cfg"])["extend"](s["params"], toks, dict(s["cache"], lengths=jnp.asarray(start)))
    for i, a in enumerate(start):
        np.testing.assert_allclose(np.asarray(logits[i]), s["ref"][i, a:a + 2], **TOL)


def test_mtp_cache_matches_mtp_forward(setup):
    """The MTP block's own latent cache: prefill over positions 0..2, then 2-position extends, give the
    model core's mtp_forward logits (depth 1 at position t predicts token t+2)."""
    s = setup
    f = _fns(s["cfg"])
    seqs, h = s["seqs"], s["h"]
    nxt = np.concatenate([seqs[:, 1:P + 1]], axis=1)  # token t+1 at position t
    mtp_logits, _, cache = f["mtp_prefill"](s["params"], h, nxt, s["cache"])
    np.testing.assert_allclose(np.asarray(mtp_logits[:, :3]), s["ref_mtp"][:, :3], **TOL)
    _, h_all, _ = f["prefill"](s["params"], seqs[:, :P], cache_lib.init_cache(s["cfg"], 3, MAX_LEN, with_mtp=True))
    cache = dict(cache, lengths=jnp.array([3, 3, 3]))
    mtp_logits, _, _ = f["mtp_extend"](s["params"], h_all[:, 3:5], seqs[:, 4:6], cache)
    np.testing.assert_allclose(np.asarray(mtp_logits), s["ref_mtp"][:, 3:5], **TOL)


@pytest.mark.slow
def test_decode_kernel_hook_matches_jnp(setup):
    """decode_impl routes single-token attention to pallas_kernels.mla.mla_decode ("xla" = its reference)."""
    s = setup
    f = _fns(s["cfg"])
    toks = s["seqs"][np.arange(3), LENS][:, None]
    a, _, _ = f["extend"](s["params"], toks, s["cache"])
    b, _, _ = f["extend_kernel"](s["params"], toks, s["cache"])
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), **TOL)
