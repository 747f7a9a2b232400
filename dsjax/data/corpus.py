"""The embedded corpus: deterministic synthetic documents for offline runs, smoke tests and demos.

It is generated in code (nothing to download, nothing to ship) and is highly regular on purpose:
templated English, arithmetic facts with their answers, counting/alphabet runs, a small fixed fact
table and R1-style `<|user|> ... <think> ... </think> <answer> ... </answer>` exchanges. A tiny LM's
loss therefore falls visibly within a few dozen steps, and the eval split (same generators, a different
seed) measures generalisation to unseen combinations rather than memorisation.
"""
from __future__ import annotations

import functools
import random

SPLITS = {"train": (0, 3000), "eval": (1, 200)}  # split -> (generator seed, number of documents)

_ADJ = ("little", "big", "red", "quiet", "happy", "old", "young", "brave", "sleepy", "clever")
_ANIMAL = ("cat", "dog", "fox", "bird", "horse", "rabbit", "mouse", "bear", "owl", "frog")
_VERB = ("sees", "finds", "likes", "chases", "carries", "watches", "hides", "wants")
_THING = ("ball", "apple", "stick", "box", "hat", "book", "stone", "cup", "kite", "key")
_PLACE = ("garden", "forest", "house", "river", "field", "park", "barn", "kitchen")
_NAME = ("Anna", "Ben", "Cara", "David", "Emma", "Felix", "Grace", "Hugo")
_FACTS = (
    ("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"), ("Canada", "Ottawa"), ("Peru", "Lima"), ("Norway", "Oslo"), ("India", "New Delhi"),
)
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def _story(r: random.Random) -> str:
    name, animal, place = r.choice(_NAME), r.choice(_ANIMAL), r.choice(_PLACE)
    out = [f"{name} has a {r.choice(_ADJ)} {animal}."]
    for _ in range(r.randint(2, 5)):
        out.append(f"The {r.choice(_ADJ)} {animal} {r.choice(_VERB)} the {r.choice(_THING)} in the {place}.")
    n = r.randint(0, 10)
    out.append(f"{name} counts {_NUMBER_WORDS[n]} {r.choice(_THING)}s. That is {n}.")
    return " ".join(out)


def _arithmetic(r: random.Random) -> str:
    lines = []
    for _ in range(r.randint(4, 8)):
        a, b = r.randint(0, 50), r.randint(0, 50)
        op = r.choice("+-*")
        if op == "-":
            a, b = max(a, b), min(a, b)
        elif op == "*":
            a, b = a % 13, b % 13
        lines.append(f"{a} {op} {b} = {_OPS[op](a, b)}")
    return "\n".join(lines)


def _sequence(r: random.Random) -> str:
    if r.random() < 0.5:
        start, step = r.randint(0, 40), r.choice((1, 1, 2, 5, 10))
        return "count: " + " ".join(str(start + step * i) for i in range(r.randint(8, 16)))
    start = r.randint(0, 15)
    return "letters: " + " ".join(_LETTERS[start: start + r.randint(6, 11)])


def _facts(r: random.Random) -> str:
    picks = r.sample(_FACTS, r.randint(2, 4))
    return " ".join(f"The capital of {c} is {k}." for c, k in picks)


def _chat(r: random.Random) -> str:
    a, b = r.randint(0, 20), r.randint(0, 20)
    return (f"<|user|>What is {a} + {b}?<|assistant|><think>{a} plus {b} makes {a + b}.</think>"
            f"<answer>{a + b}</answer>")


_KINDS = (_story, _story, _arithmetic, _sequence, _facts, _chat)


@functools.lru_cache(maxsize=None)
def embedded_documents(split: str = "train") -> tuple[str, ...]:
    """The documents of one split ("train" or "eval"); identical on every machine and every call.

    Eval documents that also occur in train (short sequences repeat by chance) are dropped, so the
    eval loss is on held-out text only.
    """
    if split not in SPLITS:
        raise ValueError(f"embedded corpus: unknown split {split!r} (have {sorted(SPLITS)})")
    seed, n = SPLITS[split]
    r = random.Random(seed)
    docs = tuple(r.choice(_KINDS)(r) for _ in range(n))
    if split != "train":
        seen = set(embedded_documents("train"))
        docs = tuple(d for d in docs if d not in seen)
    return docs
