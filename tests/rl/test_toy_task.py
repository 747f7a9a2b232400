"""The toy arithmetic task: determinism, answers checked by an independent evaluator written here,
reference completions scored by the rewards, split disjointness."""
import re

import pytest

from dsjax.rl.rewards import accuracy_reward, format_reward
from dsjax.rl.toy_task import (R1_ZERO_TEMPLATE, TOY_TEMPLATE, format_prompt, is_held_out, make_problems,
                               reference_completion)


def _evaluate(question: str) -> int:
    """Independent evaluator: parse the English chain with a regex and fold it."""
    m = re.fullmatch(r"Start with (\d+), (.*)\. What is the result\?", question)
    assert m, question
    value = int(m.group(1))
    for step in m.group(2).split(", "):
        op, k = re.fullmatch(r"(add|subtract|multiply by) (\d+)", step).groups()
        k = int(k)
        value = {"add": value + k, "subtract": value - k, "multiply by": value * k}[op]
        assert 0 <= value <= 99  # intermediate values stay small
    return value


def test_deterministic_and_seed_dependent():
    a = make_problems(50, seed=3, difficulty=2)
    assert a == make_problems(50, seed=3, difficulty=2)
    assert a != make_problems(50, seed=4, difficulty=2)
    assert make_problems(10, seed=3, difficulty=2) == a[:10]  # a prefix of a longer draw


@pytest.mark.parametrize("difficulty", [1, 2, 4])
def test_answers_correct_and_references_score_one(difficulty):
    for split in ("train", "test"):
        for p in make_problems(60, seed=0, difficulty=difficulty, split=split):
            assert p["answer"] == str(_evaluate(p["question"]))
            assert len(p["ops"]) == difficulty and p["difficulty"] == difficulty
            assert p["prompt"] == TOY_TEMPLATE.format(question=p["question"])
            ref = reference_completion(p)
            assert accuracy_reward(p["prompt"], ref, p) == 1.0
            assert accuracy_reward(p["prompt"], ref, p["answer"]) == 1.0
            assert format_reward(p["prompt"], ref, p) == 1.0
            wrong = ref.replace(f"<answer>{p['answer']}</answer>", f"<answer>{int(p['answer']) + 1}</answer>")
            assert accuracy_reward(p["prompt"], wrong, p) == 0.0


def test_reference_completion_shape():
    p = {"start": 5, "ops": [["add", 3], ["multiply by", 2]], "answer": "16"}
    assert reference_completion(p) == "<think>5 + 3 = 8. 8 * 2 = 16.</think>\n<answer>16</answer>"


def test_split_disjoint():
    for d in (1, 2):
        train = {p["question"] for s in range(3) for p in make_problems(400, seed=s, difficulty=d)}
        test = {p["question"] for p in make_problems(200, seed=0, difficulty=d, split="test")}
        assert train and test and not (train & test)
        assert all(is_held_out(q) for q in test) and not any(is_held_out(q) for q in train)


def test_templates_and_errors():
    assert "<think>" in R1_ZERO_TEMPLATE and "<answer>" in R1_ZERO_TEMPLATE
    assert format_prompt("Q?", R1_ZERO_TEMPLATE).endswith("User: Q?\nAssistant:")
    p = make_problems(1, seed=0, template=R1_ZERO_TEMPLATE)[0]
    assert p["prompt"].startswith("A conversation between User and Assistant.")
    with pytest.raises(ValueError, match="split"):
        make_problems(1, seed=0, split="val")
    with pytest.raises(ValueError, match="difficulty"):
        make_problems(1, seed=0, difficulty=0)
