"""The trainer's optimizer (dsjax.train.optim.make_optimizer: global-norm clipping, AdamW with weight decay on
matrices only, the schedule, the balancing bias frozen) against torch.optim.AdamW, on the parameter tree of
the default model cut to one dense and one MoE layer."""
import jax
import numpy as np
import optax
import torch

from dsjax.model.params import init_params
from dsjax.train.config import load_train_config
from dsjax.train.optim import _labels, make_optimizer


def _grads(params, seed, scale):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [scale * jax.random.normal(k, p.shape, p.dtype) for k, p in zip(keys, leaves)])


def test_optimizer_matches_torch_adamw():
    """float32 moments, a constant learning rate after one warm-up step, clipping on (the large gradient
    of step 2 is clipped, the others are not): torch's AdamW (decoupled decay on the "decay" group) after
    clip_grad_norm_ over every parameter; the frozen bias in no group, unchanged."""
    tcfg = load_train_config(None, ["lr=0.01", "warmup_steps=1", "decay_start_fraction=1", "decay_end_fraction=1",
                                    "model.num_hidden_layers=2", "model.num_nextn_predict_layers=0"])  # fewer leaves
    params = init_params(tcfg.model, 0)
    tx = make_optimizer(tcfg)
    state = tx.init(params)
    labels = jax.tree.leaves(_labels(tcfg.model))
    assert set(labels) == {"decay", "no_decay", "frozen"}
    tp = [torch.nn.Parameter(torch.tensor(np.asarray(p))) for p in jax.tree.leaves(params)]
    groups = [{"params": [t for t, lab in zip(tp, labels) if lab == "decay"], "weight_decay": tcfg.weight_decay},
              {"params": [t for t, lab in zip(tp, labels) if lab == "no_decay"], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=tcfg.lr, betas=(tcfg.b1, tcfg.b2), eps=tcfg.eps)

    @jax.jit
    def step(g, s, p):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    for i in range(4):
        g = _grads(params, 10 + i, 3.0 if i == 2 else 0.02)  # global norms ~37 (clipped) and ~0.25
        for t, gl in zip(tp, jax.tree.leaves(g)):
            t.grad = torch.tensor(np.asarray(gl))
        torch.nn.utils.clip_grad_norm_(tp, tcfg.clip_norm)
        if i == 0:  # the warm-up step: lr 0 in both
            for grp in opt.param_groups:
                grp["lr"] = 0.0
        opt.step()
        for grp in opt.param_groups:
            grp["lr"] = tcfg.lr
        params, state = step(g, state, params)
    for (path, a), t in zip(jax.tree_util.tree_leaves_with_path(params), tp):
        np.testing.assert_allclose(np.asarray(a), t.detach().numpy(), rtol=1e-5, atol=1e-7,
                                   err_msg=jax.tree_util.keystr(path))
