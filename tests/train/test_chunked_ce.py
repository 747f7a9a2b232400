"""Chunked cross-entropy (train.ce_chunk): the loss, logz and gradients equal the unchunked loss over
full float32 logits (the reference: cross_entropy of the model's own head, autodiff), fp32 1e-5,
with chunk sizes that do not divide the sequence."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.model.params import init_params
from dsjax.model.transformer import head
from dsjax.train.loss import chunked_cross_entropy, cross_entropy, loss_fn
from tests.train.test_step import TINY, _batch


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)


@pytest.mark.parametrize("chunk", [1, 5, 13, 32, 40])
def test_chunked_cross_entropy_equals_full_logits(chunk):
    b, s, d, v = 2, 13, 16, 37
    ks = jax.random.split(jax.random.key(0), 4)
    h = jax.random.normal(ks[0], (b, s, d))
    w = jax.random.normal(ks[1], (d, v)) * 0.3
    t = jax.random.randint(ks[2], (b, s), 0, v)
    mask = jax.random.bernoulli(ks[3], 0.8, (b, s))

    def loss(ce, h, w):  # uses both outputs, as the z-loss does
        total, n, logz = ce(h, w)
        return total / n + 0.1 * jnp.sum(jnp.square(logz) * mask)

    ref = lambda h, w: cross_entropy(head({"lm_head": w}, h, None), t, mask)
    got = lambda h, w: chunked_cross_entropy(h, w, t, mask, chunk)
    for a, r in zip(got(h, w), ref(h, w)):
        assert _rel(a, r) <= 1e-5
    g = jax.grad(lambda h, w: loss(got, h, w), argnums=(0, 1))(h, w)
    g0 = jax.grad(lambda h, w: loss(ref, h, w), argnums=(0, 1))(h, w)
    for a, r in zip(g, g0):
        assert _rel(a, r) <= 1e-5


def test_loss_fn_with_chunks_equals_unchunked():
    """The whole training loss (LM + MTP + z-loss + balance) and its parameter gradients."""
    params = init_params(TINY, 0)
    batch = _batch(b=2, s=24)
    kw = {"mtp_lambda": 0.3, "balance_alpha": 1e-3, "z_loss": 1e-3}
    f = lambda chunk: jax.jit(jax.value_and_grad(
        lambda p: loss_fn(p, batch, TINY, ce_chunk=chunk, **kw), has_aux=True))(params)
    (l0, m0), g0 = f(0)
    (l1, m1), g1 = f(7)
    assert _rel(l1, l0) <= 1e-5
    for k in ("lm_loss", "mtp_loss", "z_loss", "balance_loss"):
        assert _rel(m1[k], m0[k]) <= 1e-5, k
    flat0 = jax.tree_util.tree_flatten_with_path(g0)[0]
    for (path, a), b in zip(flat0, jax.tree.leaves(g1)):
        assert _rel(b, a) <= 1e-5, jax.tree_util.keystr(path)
