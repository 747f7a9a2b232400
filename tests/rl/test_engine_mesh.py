"""`dsjax sft` and `dsjax grpo` run on the training engine's mesh: with mesh.fsdp=4 on 4 CPU devices they
give the one-device losses (fp32, rtol 1e-5). The reference is the same command with mesh.fsdp=1 (no
mesh: every array on one device), run in the same subprocess, which has 4 emulated devices (the test
session has 8, set before jax starts)."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np

SCRIPT = textwrap.dedent("""
    import sys
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    assert len(jax.devices()) == 4, jax.devices()
    from dsjax.cli import main
    from dsjax.rl.rewards import register_reward
    # A reward a random model earns partly by chance (the toy task's accuracy and format rewards are all 0
    # for it, which leaves no advantage, a zero gradient, and Adam steps of pure rounding noise).
    register_reward("lowercase", lambda p, c, r: sum(ch.islower() and ch.isascii() for ch in c) / max(len(c), 1))
    root = sys.argv[1]
    model = ["model.num_hidden_layers=2", "model.max_position_embeddings=256"]
    common = ["progress=false", "log_every=1", "checkpoint_every=1000", "async_checkpointing=false"]
    sft = ["data=toy", "num_toy_examples=64", "difficulty=1", "max_value=20", "steps=3", "batch_size=8",
           "seq_len=128", "lr=3e-3", "warmup_steps=1"]
    grpo = ["steps=2", "prompts_per_step=2", "group_size=4", "max_new_tokens=8", "mu=2", "lr=1e-3",
            "difficulty=1", "max_value=10", "num_train_problems=8", "num_eval_problems=2", "plot=false",
            "rewards=[lowercase]", "reward_weights=[1.0]"]
    for fsdp in (1, 4):
        assert main(["sft", "--config", "configs/rl_sft_toy.yaml", "--workdir", f"{root}/sft{fsdp}",
                     *sft, *model, *common, f"mesh.fsdp={fsdp}"]) == 0
        assert main(["grpo", "--config", "configs/rl_toy.yaml", "--workdir", f"{root}/grpo{fsdp}",
                     *grpo, *model, *common, f"mesh.fsdp={fsdp}"]) == 0
""")


def _rows(path):
    with open(os.path.join(path, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["step"] > 0]


def test_sft_and_grpo_fsdp4_equal_one_device(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0 "
                         "--xla_llvm_disable_expensive_passes=true")
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    # GRPO's first inner loss has ratio 1, so it is -mean(advantage) + beta * KL: a sum of unit-scale
    # terms that cancels to ~1e-7; it gets an absolute fp32 tolerance at that scale (1e-6) on top.
    # ("accuracy" is the toy task's, 0 here, logged whatever the reward.)
    bad = []
    for task, keys in (("sft", ("loss", "token_accuracy", "grad_norm")),
                       ("grpo", ("reward", "accuracy", "loss", "loss_last_inner", "kl", "grad_norm"))):
        one, four = _rows(tmp_path / f"{task}1"), _rows(tmp_path / f"{task}4")
        assert [x["step"] for x in one] == [x["step"] for x in four] and len(one) >= 2
        for k in keys:
            a, b = np.array([x[k] for x in four]), np.array([x[k] for x in one])
            if not np.allclose(a, b, rtol=1e-5, atol=1e-6 if (task, k) == ("grpo", "loss") else 1e-8):
                bad.append((task, k, a.tolist(), b.tolist()))
    assert not bad, bad
    assert _rows(tmp_path / "sft4")[-1]["loss"] < _rows(tmp_path / "sft4")[0]["loss"]  # and it trains
