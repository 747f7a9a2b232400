"""Distillation end to end with a stub teacher: the written data holds exactly the samples the rule
reward accepts (decided here by hand), in order, and the student is SFT'd on them."""
import json
import os

import pytest

from dsjax.config import ConfigError, apply_overrides, load_config
from dsjax.rl.distill import DistillConfig, distill
from dsjax.rl.sft import SFTConfig, load_rl_config
from dsjax.rl.toy_task import make_problems
from dsjax.train.tokenizer import ByteTokenizer

SMALL = apply_overrides(load_config("tiny"), {"first_k_dense_replace": 2, "num_hidden_layers": 2,
                                              "num_nextn_predict_layers": 0, "max_position_embeddings": 256})


def test_distill_keeps_exactly_accepted_samples(tmp_path):
    problems = make_problems(5, seed=0, difficulty=1, max_value=20)
    calls = []

    def teacher(probs, prompt_ids):
        calls.append(len(probs))
        # Sample k of each problem: right answer when k is even, off by one otherwise.
        out = []
        for j, p in enumerate(probs):
            ans = int(p["answer"]) + (j % 2)
            out.append(f"<think>work {j}</think>\n<answer>{ans}</answer>")
        return out

    dcfg = DistillConfig(samples_per_prompt=2, sample_batch=4, reward="accuracy", threshold=1.0, model=SMALL,
                         sft=SFTConfig(steps=2, batch_size=2, seq_len=128, progress=False))
    student, kept, stats = distill(dcfg, str(tmp_path), teacher=teacher, problems=problems,
                                   tokenizer=ByteTokenizer(), verbose=False)
    assert calls == [4, 4, 2]  # batched by sample_batch
    # Expected by hand: flattened sample index j = 2*i + k; accepted iff j is even.
    expected = [(problems[j // 2]["question"], f"<think>work {j % 4}</think>\n<answer>{problems[j // 2]['answer']}</answer>")
                for j in range(10) if j % 2 == 0]
    got = [json.loads(x)["messages"] for x in open(tmp_path / "distill_data.jsonl")]
    assert [(m[0]["content"], m[1]["content"]) for m in got] == expected
    assert [m[0]["role"] for m in got] == ["user"] * 5 and [m[1]["role"] for m in got] == ["assistant"] * 5
    assert [(s["question"], s["completion"]) for s in kept] == expected
    assert stats["accepted"] == 5 and stats["total"] == 10
    assert json.load(open(tmp_path / "distill_stats.json"))["accepted"] == 5
    assert os.path.isdir(tmp_path / "student" / "final") and student.config == SMALL


def test_distill_config_nested_student_section(tmp_path):
    p = tmp_path / "d.yaml"
    p.write_text("teacher: some/dir\nsamples_per_prompt: 3\nmodel: {base: tiny, hidden_size: 32}\nsft:\n  steps: 7\n")
    c = load_rl_config(DistillConfig, str(p), ["sft.lr=0.01", "model.num_hidden_layers=2", "threshold=0.5"])
    assert (c.samples_per_prompt, c.threshold, c.sft.steps, c.sft.lr) == (3, 0.5, 7, 0.01)
    # The student's architecture is the top-level model section; its SFT run trains exactly that.
    assert (c.model.hidden_size, c.model.num_hidden_layers) == (32, 2) and c.sft.model == c.model
    with pytest.raises(ConfigError, match="sft.*top-level 'model:'"):
        load_rl_config(DistillConfig, str(p), ["sft.model.hidden_size=16"])
    p.write_text("teacher: some/dir\nsft:\n  model: {base: tiny}\n")
    with pytest.raises(ConfigError, match="d.yaml: sft.*top-level 'model:'"):
        load_rl_config(DistillConfig, str(p))
    with pytest.raises(ConfigError, match="sft: unknown config key 'no_such'"):
        load_rl_config(DistillConfig, None, ["sft.no_such=1"])
