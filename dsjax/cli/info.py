"""`dsjax info PATH`: PATH is a config YAML, a config.json, a checkpoint directory or a training workdir
(read only: nothing is written)."""
from __future__ import annotations


from dsjax.config import ModelConfig, load_config


def _b(n: float) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def summary(cfg: ModelConfig) -> str:
    from dsjax.model.params import count_params

    c = count_params(cfg)
    cache = cfg.kv_lora_rank + cfg.qk_rope_head_dim  # numbers per token per layer
    mha_exact = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    bf16 = 2
    lines = [
        f"model_type: {cfg.model_type}",
        f"layers: {cfg.num_hidden_layers} ({cfg.num_dense_layers} dense, {cfg.num_moe_layers} MoE), "
        f"hidden {cfg.hidden_size}, heads {cfg.num_attention_heads}, vocab {cfg.vocab_size}",
        f"attention: MLA q_lora {cfg.q_lora_rank}, kv_lora {cfg.kv_lora_rank}, "
        f"nope/rope/v {cfg.qk_nope_head_dim}/{cfg.qk_rope_head_dim}/{cfg.v_head_dim}, softmax scale {cfg.softmax_scale:.6f}",
        f"moe: {cfg.n_routed_experts} routed (width {cfg.moe_intermediate_size}) + {cfg.n_shared_experts} shared, "
        f"top-{cfg.num_experts_per_tok}, {cfg.scoring_func}/{cfg.topk_method}, groups {cfg.n_group} keep {cfg.topk_group}",
        f"mtp depth: {cfg.num_nextn_predict_layers}",
        f"total parameters: {_b(c['total'])}",
        f"active parameters per token: {_b(c['active'])}",
        f"mtp parameters: {_b(c['mtp'])} (not counted above; embedding and head shared)",
        f"latent cache per token: {cache} numbers/layer, {cache * bf16 * cfg.num_hidden_layers / 1024:.1f} KiB in bf16 "
        f"over {cfg.num_hidden_layers} layers (plain MHA: {mha_exact} numbers/layer, {mha_exact / cache:.1f}x more)",
    ]
    return "\n".join(lines)


def run(args) -> int:
    from dsjax.checkpoint import native
    from dsjax.train import workdir_io

    path = args.path
    # a native checkpoint, a post-training workdir (its final model), a training workdir (local or gs://)
    for parts in ((native.MARKER,), ("final", native.MARKER), ("run_config.yaml",)):
        if workdir_io.exists(workdir_io.join(path, *parts)):
            cfg = native.read_config(workdir_io.join(path, *parts))
            break
    else:
        cfg = load_config(path)
    print(summary(cfg))
    return 0


def register(sub, help_):
    p = sub.add_parser("info", help=help_, description=help_)
    p.add_argument("path", help="config YAML, config.json, or checkpoint directory")
    p.set_defaults(func=run)
