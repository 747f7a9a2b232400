"""GRPO training: with a fixed batch of rollouts the first inner step has ratio 1 (logp_old == logp_new,
clip fraction 0) and the loss falls over inner steps; rollout packing aligns the mask with the sampled
tokens; a short run on the toy task raises the mean reward and a smoke run exercises the loop."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsjax
from dsjax.config import apply_overrides, load_config
from dsjax.rl.grpo import group_advantages
from dsjax.rl.grpo_trainer import GRPOConfig, grpo_inner_steps, make_update, optimizer_config, train_grpo
from dsjax.rl.rollout import logprob_fn, pack_rollouts, sample_completions
from dsjax.train.step import init_state

SMALL = apply_overrides(load_config("tiny"), {"first_k_dense_replace": 2, "num_hidden_layers": 2,
                                              "num_nextn_predict_layers": 0, "max_position_embeddings": 256})


def test_pack_rollouts_mask_marks_completion_targets():
    rb = pack_rollouts([[1, 10, 11], [1, 12]], [[20, 21, 2], [22]], length=8)
    np.testing.assert_array_equal(rb.tokens, [[1, 10, 11, 20, 21, 2, 0, 0], [1, 12, 22, 0, 0, 0, 0, 0]])
    # mask[t] = 1 iff tokens[t+1] is a completion token (hand-derived).
    np.testing.assert_array_equal(rb.mask, [[0, 0, 1, 1, 1, 0, 0], [0, 1, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(rb.segment_ids, [[1] * 6 + [0] * 2, [1] * 3 + [0] * 5])


def _fixed_batch(model, gcfg):
    rng = np.random.default_rng(0)
    prompts = [[1] + rng.integers(3, 200, 6).tolist() for _ in range(gcfg.prompts_per_step)]
    rep = [p for p in prompts for _ in range(gcfg.group_size)]
    comps = sample_completions(model, rep, max_new_tokens=8, temperature=1.0, seed=1, stop_tokens=[2])
    rewards = np.array([float(len(c) % 3) for c in comps], np.float32)  # any non-constant reward
    adv = group_advantages(rewards.reshape(gcfg.prompts_per_step, -1) + rng.normal(size=(gcfg.prompts_per_step,
                                                                                      gcfg.group_size))).reshape(-1)
    rb = pack_rollouts(rep, comps, 32)
    tokens, seg = jnp.asarray(rb.tokens), jnp.asarray(rb.segment_ids)
    logp_old = logprob_fn(model.config, 1.0)(model.params, tokens, seg)
    return {"tokens": tokens, "segment_ids": seg, "mask": jnp.asarray(rb.mask), "advantages": adv,
            "logp_old": logp_old, "logp_ref": logp_old}


def test_inner_steps_ratio_one_then_loss_decreases():
    model = dsjax.init(SMALL, 0)
    gcfg = GRPOConfig(prompts_per_step=2, group_size=4, mu=4, lr=3e-3, beta=0.04, clip_eps=0.2, model=SMALL)
    batch = _fixed_batch(model, gcfg)
    state = init_state(jax.tree.map(jnp.copy, model.params), optimizer_config(gcfg, SMALL))
    update = jax.jit(make_update(SMALL, gcfg))
    state, ms = grpo_inner_steps(update, state, batch, gcfg.mu)
    assert ms[0]["ratio"] == pytest.approx(1.0, abs=1e-6)
    assert ms[0]["clip_frac"] == 0.0 and ms[0]["kl"] == pytest.approx(0.0, abs=1e-7)
    losses = [m["loss"] for m in ms]
    assert losses[-1] < losses[0], losses
    assert ms[-1]["ratio"] != pytest.approx(1.0, abs=1e-6)  # the policy moved away from the sampler


def _toy_cfg(**kw):
    base = dict(steps=2, prompts_per_step=2, group_size=4, max_new_tokens=8, mu=2, lr=1e-3, difficulty=1,
                max_value=10, num_train_problems=16, num_eval_problems=8, checkpoint_every=1, plot=True,
                progress=False, model=SMALL)
    base.update(kw)
    return GRPOConfig(**base)


def test_grpo_smoke_run_logs_curves_and_resumes(tmp_path):
    wd = str(tmp_path / "g")
    _, rows = train_grpo(_toy_cfg(steps=1), wd, verbose=False)
    _, rows2 = train_grpo(_toy_cfg(), wd, verbose=False)  # resumes after step 1
    assert [r["step"] for r in rows] == [0, 1] and [r["step"] for r in rows2] == [2]
    for k in ("reward", "accuracy", "format", "response_length", "kl", "clip_frac", "eval_accuracy",
              "rollout_tokens_per_sec"):
        assert k in rows2[-1]
    lines = [json.loads(x) for x in open(os.path.join(wd, "metrics.jsonl"))]
    assert [x["step"] for x in lines] == [0, 1, 2]
    assert os.path.getsize(os.path.join(wd, "grpo.png")) > 1000
    assert os.path.isdir(os.path.join(wd, "final"))


@pytest.mark.slow  # 110-210 s: the suite's longest test (CI keeps test_grpo_smoke_run_logs_curves_and_resumes)
def test_short_grpo_run_raises_mean_reward_on_toy_task(tmp_path):
    """Four toy problems of one operation. A brief SFT teaches the answer format and, for each problem,
    the right solution once for every three lazy ones (the start value, the operation skipped); GRPO with
    the R1-Zero rewards (accuracy + 0.5 format) then shifts the sampled groups to the right answers."""
    from dsjax.rl.sft import SFTConfig, sft
    from dsjax.rl.toy_task import make_problems, reference_completion
    from dsjax.train.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    problems = make_problems(4, seed=0, difficulty=1, max_value=20)
    lazy = [f"<think></think>\n<answer>{p['start']}</answer>" for p in problems]
    assert all(p["answer"] != str(p["start"]) for p in problems)  # the lazy answer is wrong
    examples = [[{"role": "user", "content": p["question"]}, {"role": "assistant", "content": c}]
                for p, bad in zip(problems, lazy) for c in [reference_completion(p), bad, bad, bad] * 2]
    scfg = SFTConfig(steps=150, batch_size=8, seq_len=128, lr=3e-3, warmup_steps=5, log_every=40,
                     checkpoint_every=1000, progress=False, model=SMALL)
    model, _ = sft(scfg, str(tmp_path / "sft"), examples=examples, tokenizer=tok, verbose=False)
    cfg = _toy_cfg(steps=12, prompts_per_step=4, group_size=8, max_new_tokens=48, mu=2, lr=3e-4, beta=0.0,
                   checkpoint_every=1000, plot=False)
    _, rows = train_grpo(cfg, str(tmp_path / "grpo"), model=model, problems=problems, eval_problems=[],
                         tokenizer=tok, verbose=False)
    reward = [r["reward"] for r in rows]
    acc = [r["accuracy"] for r in rows]
    assert 0.1 < np.mean(acc[:2]) < 0.9, acc  # the warm-up left both answers in the groups
    assert np.mean(reward[-2:]) > np.mean(reward[:2]) + 0.2, reward
    assert np.mean(acc[-2:]) > np.mean(acc[:2]) + 0.2, acc


@pytest.mark.slow
def test_short_grpo_run_raises_mean_reward(tmp_path):
    """A random tiny model rewarded for the fraction of lowercase letters in its completion (a reward it
    earns partly by chance): the mean reward of the sampled groups climbs within a few steps."""
    from dsjax.rl.rewards import register_reward

    register_reward("lowercase", lambda p, c, r: sum(ch.islower() and ch.isascii() for ch in c) / max(len(c), 1),
                    overwrite=True)
    cfg = _toy_cfg(steps=8, prompts_per_step=4, group_size=8, mu=2, lr=1e-2, beta=0.0, rewards=("lowercase",),
                   reward_weights=(1.0,), num_eval_problems=1, checkpoint_every=100, plot=False)
    model = dsjax.init(SMALL, 0)
    _, rows = train_grpo(cfg, str(tmp_path / "g"), model=model, verbose=False)
    r = [x["reward"] for x in rows if x["step"] > 0]
    assert np.mean(r[-3:]) > np.mean(r[:3]) + 0.1, r
