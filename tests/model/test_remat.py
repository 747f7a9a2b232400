"""Remat policies (model.remat_policy, dsjax.model.remat): each gives the loss and gradients of no
remat (the reference: the same model with remat_policy=none, float32, 1e-5), and the host-offload
policy lowers and compiles for a small TPU topology with the layer inputs in host memory. On CPU
the offload is a copy within the same RAM (jax's CPU devices have a pinned_host space): same numbers,
no memory saved."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.config import load_config
from dsjax.model import remat
from dsjax.model.params import init_params
from dsjax.model.transformer import forward
from tests.parallel.test_compile import needs_tpu_compiler

CFG = load_config("configs/tiny.yaml").replace(num_hidden_layers=4, first_k_dense_replace=2)


def _loss(params, tokens, cfg):
    logits, aux = forward(params, tokens, cfg)
    lp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.take_along_axis(lp, tokens[:, 1:, None], -1).mean() + aux["mtp_logits"].mean()


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)


@pytest.fixture(scope="module")
def reference():
    params = init_params(CFG, 0)
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, CFG.vocab_size)
    return params, tokens, jax.jit(jax.value_and_grad(lambda p, t: _loss(p, t, CFG)))(params, tokens)


@pytest.mark.parametrize("policy", [p for p in remat.POLICIES if p != "none"])
def test_policy_gives_the_same_loss_and_gradients(reference, policy):
    params, tokens, (loss0, grads0) = reference
    cfg = CFG.replace(remat_policy=policy)
    loss, grads = jax.jit(jax.value_and_grad(lambda p, t: _loss(p, t, cfg)))(params, tokens)
    assert _rel(loss, loss0) <= 1e-5
    flat0 = jax.tree_util.tree_flatten_with_path(grads0)[0]
    for (path, g0), g in zip(flat0, jax.tree.leaves(grads)):
        assert _rel(g, g0) <= 1e-5, jax.tree_util.keystr(path)


def test_unknown_policy_is_a_config_error():
    with pytest.raises(ValueError, match="remat_policy"):
        CFG.replace(remat_policy="offload_everything")


@needs_tpu_compiler
# "full" (17 s) in the slow set for CI time; its numerics are test_policy_gives_the_same_loss_and_gradients'.
@pytest.mark.parametrize("policy", [pytest.param("full", marks=pytest.mark.slow), "offload_inputs"])
def test_policy_compiles_for_tpu(policy):
    """AOT compile of the training step on a v5p-8 (4 chips, fsdp 4); with offload_inputs the
    compiled program holds the saved layer inputs in TPU host memory (memory space S(5))."""
    from dsjax.parallel import aot
    from dsjax.train.config import load_train_config

    tcfg = load_train_config("configs/tiny.yaml", ["mesh.fsdp=4", "batch_size=4", "seq_len=32",
                                                   f"model.remat_policy={policy}", "model.num_hidden_layers=2",
                                                   "model.num_nextn_predict_layers=0"])  # a dense + a MoE layer
    rep = aot.compile_report(tcfg, "v5p:2x2x1")
    assert rep.compiled and rep.fits
    assert (rep.host_temp_bytes > 0) == (policy == "offload_inputs")
