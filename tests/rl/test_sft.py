"""SFT: the chat rendering and its loss mask (checked against the rendered string and against
dsjax.infer.chat.encode_chat), packing, the masked loss (against a per-example loss computed by hand) and
a short end-to-end run through `sft` that resumes and lowers the loss."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.config import ConfigError, apply_overrides, load_config
from dsjax.infer.chat import encode_chat
from dsjax.rl.sft import PackedChatData, SFTConfig, load_chat_jsonl, load_policy, load_rl_config, render_chat, sft, sft_loss
from dsjax.train.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
CONV = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>two and two</think>\n<answer>4</answer>"},
        {"role": "user", "content": "and 3+3?"},
        {"role": "assistant", "content": "<think>three and three</think><answer>6</answer>"}]
SMALL = apply_overrides(load_config("tiny"), {"first_k_dense_replace": 3, "num_nextn_predict_layers": 0,
                                              "num_hidden_layers": 2, "max_position_embeddings": 256})


def test_loss_mask_is_exactly_the_assistant_tokens():
    ids, mask = render_chat(CONV, TOK)
    assert len(ids) == len(mask)
    # The whole rendered string, written out by hand (bos/eos carry no text).
    assert TOK.decode(ids) == ("<|system|>Be brief.<|user|>2+2?<|assistant|><answer>4</answer>"
                               "<|user|>and 3+3?<|assistant|><think>three and three</think><answer>6</answer>")
    masked = [i for i, m in zip(ids, mask) if m]
    # Assistant contents (earlier turn without its reasoning, as in R1's template) and an eos after each.
    assert TOK.decode(masked) == "<answer>4</answer><think>three and three</think><answer>6</answer>"
    assert masked.count(TOK.eos_id) == 2 and ids.count(TOK.eos_id) == 2
    # Everything unmasked is context: bos, system, user turns and the assistant markers.
    assert TOK.decode([i for i, m in zip(ids, mask) if not m]) == \
        "<|system|>Be brief.<|user|>2+2?<|assistant|><|user|>and 3+3?<|assistant|>"
    # Each masked span starts right after a generation prompt identical to the inference template's.
    starts = [k for k in range(1, len(mask)) if mask[k] and not mask[k - 1]]
    assert ids[:starts[0]] == encode_chat(CONV[:2], TOK)
    assert ids[:starts[1]] == encode_chat(CONV[:4], TOK)


def test_packing_rows_segments_positions():
    ex = [render_chat([{"role": "user", "content": "q" * n}, {"role": "assistant", "content": "a" * n}], TOK)
          for n in (3, 5, 7, 40)]
    data = PackedChatData(ex, seq_len=32, batch_size=2, seed=0)
    b = data.batch(0)
    assert b["tokens"].shape == (2, 32)
    for r in range(2):
        seg, pos, tok, m = (b[k][r] for k in ("segment_ids", "positions", "tokens", "loss_mask"))
        for s in set(seg.tolist()) - {0}:
            idx = np.nonzero(seg == s)[0]
            assert (pos[idx] == np.arange(len(idx))).all() and tok[idx[0]] == TOK.bos_id
        assert (tok[seg == 0] == 0).all() and (m[seg == 0] == 0).all()
    # The same step always gives the same batch (resumption needs no iterator state).
    b2 = PackedChatData(ex, seq_len=32, batch_size=2, seed=0).batch(0)
    assert all((b[k] == b2[k]).all() for k in b)


def test_sft_loss_matches_per_example_reference():
    """Packed masked loss == the token-weighted mean of each example's own loss, computed unpacked."""
    import dsjax
    from dsjax.model.transformer import forward

    model = dsjax.init(SMALL, 0)
    convs = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}],
             [{"role": "user", "content": "2+2"}, {"role": "assistant", "content": "<answer>4</answer>"}]]
    ex = [render_chat(c, TOK) for c in convs]
    batch = PackedChatData(ex, seq_len=64, batch_size=1, seed=0).batch(0)
    assert batch["segment_ids"].max() == 2
    loss, m = sft_loss(model.params, jax.tree.map(jnp.asarray, batch), SMALL)
    tot, n = 0.0, 0
    for ids, mask in ex:
        logits, _ = forward(model.params, jnp.asarray([ids]), SMALL, with_mtp=False)
        logp = jax.nn.log_softmax(logits[0, :-1], -1)
        nll = -np.take_along_axis(np.asarray(logp), np.asarray(ids[1:])[:, None], -1)[:, 0]
        tot += float((nll * np.asarray(mask[1:])).sum())
        n += int(np.sum(mask[1:]))
    assert int(m["tokens"]) == n
    np.testing.assert_allclose(float(loss), tot / n, rtol=2e-4)


def test_config_loader_and_errors(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: {base: tiny, num_hidden_layers: 2}\nsteps: 5\nlr: 1e-3\n")
    c = load_rl_config(SFTConfig, str(p), ["batch_size=4", "model.hidden_size=32"])
    assert (c.steps, c.batch_size, c.lr, c.model.num_hidden_layers, c.model.hidden_size) == (5, 4, 1e-3, 2, 32)
    with pytest.raises(ConfigError, match="bogus"):
        load_rl_config(SFTConfig, str(p), ["bogus=1"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "x"}]}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        load_chat_jsonl(str(bad))


def test_sft_end_to_end_resume_and_final_model(tmp_path):
    data = tmp_path / "chat.jsonl"
    with open(data, "w") as f:
        for k in range(12):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"say {k}"},
                                             {"role": "assistant", "content": f"<answer>{k}</answer>"}]}) + "\n")
    cfg = SFTConfig(data=str(data), steps=6, batch_size=2, seq_len=64, lr=3e-3, warmup_steps=0, log_every=1,
                    checkpoint_every=3, progress=False, model=SMALL)
    wd = str(tmp_path / "run")
    from dsjax.rl import sft as sft_mod

    _, rows = sft(dataclasses_replace(cfg, steps=3), wd)
    _, rows2 = sft(cfg, wd)  # resumes at step 3
    assert [r["step"] for r in rows] == [1, 2, 3] and [r["step"] for r in rows2] == [4, 5, 6]
    assert rows2[-1]["loss"] < rows[0]["loss"]
    m = load_policy(wd)  # the workdir's final model
    assert m.config == SMALL
    assert os.path.exists(os.path.join(wd, sft_mod.FINAL_DIR))
    lines = [json.loads(x) for x in open(os.path.join(wd, "metrics.jsonl"))]
    assert [x["step"] for x in lines] == [1, 2, 3, 4, 5, 6]


def dataclasses_replace(c, **kw):
    import dataclasses

    return dataclasses.replace(c, **kw)
