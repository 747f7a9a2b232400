"""HF transformers' DeepseekV3ForCausalLM trained in torch: the independent reference that
benchmarks/spike_check.py compares dsjax's training against (same weights, batches and optimizer recipe).

The model is built from a dsjax parameter tree (exported by dsjax.checkpoint.hf_io.save_hf, loaded by
from_pretrained); packed batches (several documents per row) become a block-diagonal causal 4D mask and the
rows' position ids; the loss is masked next-token cross-entropy written here, independently of dsjax.
"""
from __future__ import annotations

import math
import os
import time

import numpy as np

from dsjax.checkpoint.hf_io import save_hf


def hf_model(tree, cfg, where: str):
    """A params-shaped tree (weights or gradients) as HF transformers' DeepseekV3ForCausalLM: exported by
    dsjax's save_hf (no MTP layer: HF has none), read back by from_pretrained (its own name/layout map,
    e.g. the fused gate_up_proj of the experts)."""
    import torch
    from transformers import DeepseekV3ForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    save_hf(tree, cfg.model, where, mtp_layout="none")
    return DeepseekV3ForCausalLM.from_pretrained(where, dtype=torch.float32, attn_implementation="eager")


def torch_inputs(batch):
    """(tokens, segment ids, positions, additive attention mask [b, 1, s, s]) of a packed batch for HF's
    model: attention only within a document (segment) and causal."""
    import torch

    tok = torch.as_tensor(batch["tokens"], dtype=torch.long)
    seg = torch.as_tensor(batch["segment_ids"])
    pos = torch.as_tensor(batch["positions"], dtype=torch.long)
    s = tok.shape[1]
    allowed = torch.tril(torch.ones(s, s, dtype=torch.bool))[None] & (seg[:, :, None] == seg[:, None, :])
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]
    return tok, seg, pos, mask


def torch_loss(model, batch):
    """Masked next-token cross-entropy of a packed batch, written independently of dsjax: attention only
    within a document (segment) and causal; targets t+1 inside the same document."""
    import torch

    tok, seg, pos, mask = torch_inputs(batch)
    logits = model(input_ids=tok, attention_mask=mask, position_ids=pos).logits.float()
    valid = ((seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] != 0)).reshape(-1).float()
    tl = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tok[:, 1:].reshape(-1),
                                           reduction="none")
    return (tl * valid).sum() / valid.sum()


def schedule(i: int, peak: float, warm: int, total: int, decay_start=0.67, decay_end=0.96, final=0.1) -> float:
    """The learning rate of update i (0-based): linear warm-up from 0, constant, cosine to final*peak."""
    start, end = max(int(total * decay_start), warm), max(int(total * decay_end), int(total * decay_start))
    if i < warm:
        return peak * i / warm
    if i < start:
        return peak
    if i < end:
        return peak * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * (i - start) / max(end - start, 1))))
    return peak * final


def hf_run(cfg, params0, data, tmp: str) -> dict:
    """HF DeepseekV3 trained in torch float32 from params0 on `data` with V3's AdamW recipe."""
    import torch

    model = hf_model(params0, cfg, os.path.join(tmp, "init"))
    model.train()
    named = list(model.named_parameters())
    decay = [p for n, p in named if "norm" not in n]  # norms (…layernorm, model.norm) are not decayed
    no_decay = [p for n, p in named if "norm" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=0.0, betas=(cfg.b1, cfg.b2),
                            eps=cfg.eps, foreach=False)
    out = {"loss": [], "grad_norm": [], "lr": []}
    t0 = time.perf_counter()
    for i, b in enumerate(data):
        opt.zero_grad(set_to_none=True)
        loss = torch_loss(model, b)
        loss.backward()
        norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for _, p in named)).item()
        if norm > cfg.clip_norm:
            for _, p in named:
                p.grad.mul_(cfg.clip_norm / norm)
        lr = schedule(i, cfg.lr, cfg.warmup_steps, cfg.steps, cfg.decay_start_fraction, cfg.decay_end_fraction,
                      cfg.final_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.step()
        out["loss"].append(loss.item())
        out["grad_norm"].append(norm)
        out["lr"].append(lr)
    out["seconds"] = time.perf_counter() - t0
    return out


def spike_anatomy(cfg, params, batch, step: int, tmp: str) -> list[str]:
    """Where a spike's gradient comes from (HF model at dsjax's parameters of that step): the gradient norm
    of each predicted token's own loss term (weighted 1/N as in the batch loss), and the scale of the
    activations that the RMSNorms rescale (their Jacobian goes as 1 / rms of their input)."""
    import torch

    model = hf_model(params, cfg, os.path.join(tmp, "anatomy"))
    named = [p for _, p in model.named_parameters()]
    seg = batch["segment_ids"]
    total = torch_loss(model, batch)
    g_all = torch.autograd.grad(total, named, retain_graph=True)
    n_all = math.sqrt(sum(float((g.double() ** 2).sum()) for g in g_all))
    # per-token loss terms: the same loss with one token's target kept
    norms = []
    valid = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] != 0)
    n_valid = int(valid.sum())
    for row in range(seg.shape[0]):
        for j in range(seg.shape[1] - 1):
            if not valid[row, j]:
                continue
            keep = np.zeros_like(valid)
            keep[row, j] = True
            norms.append((per_token_grad_norm(model, named, batch, keep, n_valid), row, j))
    norms.sort(reverse=True)
    rms = {}

    def hook(name):
        def record(mod, inp, out):  # returns None: the module's output stays as it is
            rms[name] = inp[0].detach().pow(2).mean(-1).sqrt()
        return record

    hooks = [model.model.layers[0].input_layernorm.register_forward_hook(hook("layer 0 input (embeddings)")),
             model.model.layers[0].self_attn.kv_a_layernorm.register_forward_hook(hook("layer 0 kv latent")),
             model.model.layers[0].self_attn.q_a_layernorm.register_forward_hook(hook("layer 0 q latent")),
             model.model.norm.register_forward_hook(hook("final norm input"))]
    with torch.no_grad():
        torch_loss(model, batch)
    for h in hooks:
        h.remove()
    (g0, r0, j0), med = norms[0], float(np.median([x[0] for x in norms]))
    return [f"anatomy of the step-{step} spike (seed {cfg.seed}, HF model at dsjax's parameters): batch gradient norm "
            f"{n_all:.1f}; one predicted token's loss term alone (row {r0}, position {j0}, target token "
            f"{int(batch['tokens'][r0, j0 + 1])}) gives {g0:.1f}, the next largest " + ", ".join(
                f"{g:.2f} (row {r}, position {j})" for g, r, j in norms[1:3]) + ", "
            f"the median of the {len(norms)} terms {med:.4f}",
            "  rms of the RMSNorm inputs (median over tokens / at that row, positions 0-3): " + "; ".join(
                f"{k} {float(v.median()):.3f} / " + " ".join(f"{float(x):.3f}" for x in v[r0, :4]) for k, v in rms.items()),
            f"  init_std {cfg.model.init_std} = {cfg.model.init_std * cfg.model.hidden_size ** 0.5:.3f} / sqrt(hidden "
            f"{cfg.model.hidden_size}); V3's 0.006 at hidden 7168 is {0.006 * 7168 ** 0.5:.3f} / sqrt(hidden), which here "
            f"would be init_std {0.006 * 7168 ** 0.5 / cfg.model.hidden_size ** 0.5:.4f}"]


def per_token_grad_norm(model, named, batch, keep, n_valid) -> float:
    """Norm of the gradient of one token's loss term, divided by the batch's token count as in the loss."""
    import torch

    tok, seg, pos, mask = torch_inputs(batch)
    row, j = map(int, np.argwhere(keep)[0])
    logits = model(input_ids=tok[row:row + 1, :j + 1], attention_mask=mask[row:row + 1, :, :j + 1, :j + 1],
                   position_ids=pos[row:row + 1, :j + 1]).logits.float()
    loss = torch.nn.functional.cross_entropy(logits[0, j][None], tok[row, j + 1][None]) / n_valid
    g = torch.autograd.grad(loss, named, allow_unused=True)
    return math.sqrt(sum(float((x.double() ** 2).sum()) for x in g if x is not None))
