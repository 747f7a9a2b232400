"""Rule rewards on edge cases (expected values written by hand), the registry, and the rejection filter."""
import math

import numpy as np
import pytest

from dsjax.rl.distill_filter import rejection_filter
from dsjax.rl.rewards import (accuracy_reward, answers_match, combine_rewards, extract_answer, format_reward,
                              get_reward, list_rewards, parse_number, register_reward, score_batch)


@pytest.mark.parametrize("completion,want", [
    ("<think>2+2</think><answer>4</answer>", "4"),
    ("<think>x</think><answer> 4 </answer> trailing", "4"),
    ("<answer>1</answer> then <answer>2</answer>", "2"),                 # last pair wins
    ("<answer>1</answer> <answer>2", "1"),                                # unclosed last tag: last complete pair
    ("<think>so it is 7</think>  7 apples ", "7 apples"),                 # after </think>
    ("<think>so it is 7</think>   ", "7"),                               # blank after </think>: last number
    ("blah. Answer: 12\nmore text", "12"),
    ("the answer is 3/4", "3/4"),
    ("I get 3 then 5 then 1,000", "1,000"),                               # last number
    ("so x = 10-3", "3"),                                                 # a sign after a digit is an operator
    ("it is -3", "-3"),
    ("no digits at all", None),
    ("<answer></answer>", ""),                                            # empty answer
    ("", None),
])
def test_extract_answer(completion, want):
    assert extract_answer(completion) == want


def test_extract_answer_non_string():
    assert extract_answer(None) is None and extract_answer(3) is None


@pytest.mark.parametrize("s,want", [
    ("3", 3), ("3.0", 3), ("-1,000", -1000), ("1,000.5", 1000.5), ("1/2", 0.5), (" 2 / 4 ", 0.5),
    ("\\frac{1}{2}", 0.5), ("$5$", 5), ("\\boxed{42}", 42), ("42.", 42), ("\u22124", -4), ("２", 2),
    ("2.5e3", 2500), (".5", 0.5),
])
def test_parse_number_valid(s, want):
    assert parse_number(s) == want


@pytest.mark.parametrize("s", ["", "abc", "1,00", "1,0000", "1.2.3", "1/0", "1/2/3", "--3", "3-", "inf", "nan",
                               "1e", "0x10", "1" * 100, "½x", None, "4 apples"])
def test_parse_number_malformed_is_none(s):
    assert parse_number(s) is None


@pytest.mark.parametrize("pred,ref,want", [
    ("3.0", "3", True), ("1,000", "1000", True), ("1/2", "0.5", True), ("0.3333333", "1/3", True),
    ("0.33", "1/3", False), ("3", "4", False), ("  Paris. ", "paris", True), ("ＡＢＣ", "abc", True),
    ("café", "cafe\u0301", True),  # NFKC composes the accent
    ("New   York", "new york", True), ("", "", False), ("1,00", "100", False), ("1/0", "1/0", True),
])
def test_answers_match(pred, ref, want):
    assert answers_match(pred, ref) is want


@pytest.mark.parametrize("completion,ref,want", [
    ("<think>3*1</think><answer>3.0</answer>", "3", 1.0),
    ("<think></think><answer>1,000</answer>", "1000", 1.0),
    ("<think>half</think><answer>1/2</answer>", {"answer": "0.5"}, 1.0),   # problem dict as reference
    ("<answer>5</answer>", 5, 1.0),                                        # numeric reference
    ("preamble <think>x</think><answer>7</answer> postscript", "7", 1.0),  # accuracy ignores format
    ("<think>x</think><answer>8</answer>", "7", 0.0),
    ("<think>x</think><answer>7..</answer>", "7", 1.0),
    ("<think>x</think><answer>1,00</answer>", "100", 0.0),                 # malformed number: no credit
    ("<think>x</think><answer>1/0</answer>", "0", 0.0),
    ("<think>x</think><answer></answer>", "0", 0.0),                       # empty answer
    ("<think>x</think><answer>😀</answer>", "😀", 1.0),                     # unicode
    ("no tags, but the answer is 12", "12", 1.0),
    ("", "1", 0.0),
    ("<answer>1</answer>", None, 0.0),                                     # bad reference never raises
    ("<answer>1</answer>", {"other": 1}, 0.0),
    ("<answer>1</answer>", float("nan"), 0.0),
])
def test_accuracy_reward(completion, ref, want):
    assert accuracy_reward("prompt", completion, ref) == want


@pytest.mark.parametrize("completion,want", [
    ("<think>reason</think><answer>4</answer>", 1.0),
    ("  <think>\nmulti\nline\n</think>\n\n<answer> 4 </answer>\n", 1.0),
    ("<think></think><answer>4</answer>", 1.0),                            # empty reasoning is allowed
    ("<think>r</think><answer>  </answer>", 0.0),                          # blank answer is not
    ("<think>r</think><answer></answer>", 0.0),
    ("<think>r</think>", 0.0),                                             # missing answer
    ("<answer>4</answer>", 0.0),                                           # missing think
    ("<answer>4</answer><think>r</think>", 0.0),                           # wrong order
    ("hello <think>r</think><answer>4</answer>", 0.0),                     # text before
    ("<think>r</think><answer>4</answer> bye", 0.0),                       # text after
    ("<think>r</think> between <answer>4</answer>", 0.0),                  # text between
    ("<think>a<think>b</think></think><answer>4</answer>", 0.0),           # nested
    ("<think>a<answer>4</answer></think><answer>4</answer>", 0.0),         # nested answer in think
    ("<think>r</think><answer>4</answer><answer>5</answer>", 0.0),         # duplicated
    ("<think>r</think><think>s</think><answer>4</answer>", 0.0),
    ("<think>r</think><answer>4", 0.0),                                    # unclosed
    ("<think>r<answer>4</answer>", 0.0),
    ("<think>r</think><answer>4</answer>\u3000", 1.0),                     # unicode whitespace
    ("<think>思考</think><answer>四</answer>", 1.0),
    ("<THINK>r</THINK><ANSWER>4</ANSWER>", 0.0),                           # tags are case-sensitive
    ("", 0.0),
])
def test_format_reward(completion, want):
    assert format_reward("prompt", completion, "4") == want


def test_format_reward_non_string():
    assert format_reward("p", None, "4") == 0.0


def test_registry_and_combine():
    assert {"accuracy", "format"} <= set(list_rewards())
    assert get_reward("accuracy") is accuracy_reward
    with pytest.raises(KeyError, match="unknown reward 'nope'"):
        get_reward("nope")

    def length_penalty(prompt, completion, reference):
        return -0.01 * len(completion)

    register_reward("test_length", length_penalty)
    register_reward("test_length", length_penalty)  # same function again is fine
    with pytest.raises(ValueError, match="already registered"):
        register_reward("test_length", lambda p, c, r: 0.0)
    register_reward("test_length", length_penalty, overwrite=True)
    with pytest.raises(TypeError):
        register_reward("bad", 3)

    c = "<think>x</think><answer>4</answer>"  # 33 chars
    r1 = combine_rewards(["accuracy", "format"])
    assert r1("p", c, "4") == 2.0 and r1("p", c, "5") == 1.0
    r2 = combine_rewards(["accuracy", format_reward, "test_length"], [1.0, 0.5, 1.0])
    assert r2("p", c, "4") == pytest.approx(1.0 + 0.5 - 0.01 * len(c))
    with pytest.raises(ValueError, match="weights"):
        combine_rewards(["accuracy"], [1.0, 2.0])

    got = score_batch("accuracy", ["p"] * 3, [c, c, "x"], ["4", "5", "4"])
    assert got.dtype == np.float32 and got.tolist() == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="2 completions"):
        score_batch("accuracy", ["p"] * 3, [c, c], ["4"] * 3)


def test_rejection_filter_keeps_exactly_accepted():
    good = "<think>x</think><answer>4</answer>"
    samples = [
        {"prompt": "a", "completion": good, "reference": "4", "id": 0},                 # acc 1 fmt 1 -> 2
        {"prompt": "b", "completion": good, "reference": "5", "id": 1},                 # 0 + 1 -> 1
        {"prompt": "c", "completion": "answer: 4", "reference": "4", "id": 2},          # 1 + 0 -> 1
        {"prompt": "d", "completion": "<think>y</think><answer>6</answer>", "reference": {"answer": "6"}, "id": 3},
        {"prompt": "e", "completion": "", "reference": "1", "id": 4},                    # 0
    ]
    fn = combine_rewards(["accuracy", "format"])
    kept, stats = rejection_filter(samples, fn, threshold=2.0)
    assert [s["id"] for s in kept] == [0, 3] and kept[0] is samples[0]
    assert stats == {"total": 5, "accepted": 2, "accepted_fraction": 0.4, "mean_reward": pytest.approx(6 / 5)}
    kept, stats = rejection_filter(samples, "accuracy", threshold=1.0)
    assert [s["id"] for s in kept] == [0, 2, 3] and stats["accepted_fraction"] == pytest.approx(0.6)
    kept, _ = rejection_filter(samples, lambda p, c, r: math.nan, threshold=-1e9)
    assert kept == []
    assert rejection_filter([], "accuracy", 1.0) == ([], {"total": 0, "accepted": 0, "accepted_fraction": 0.0,
                                                          "mean_reward": 0.0})
    with pytest.raises(ValueError, match="sample 1 lacks"):
        rejection_filter([samples[0], {"prompt": "x"}], "accuracy", 1.0)
