"""Rule-based rewards for R1-style RL (DeepSeek-R1 paper): accuracy of the final answer and the think/answer format.

A reward is a plain Python callable

    reward(prompt: str, completion: str, reference: str | dict) -> float

where `reference` is the expected answer, or a dict holding it under "answer" (a toy-task problem dict
can be passed as is). Rewards never raise on model output: a completion that cannot be scored scores 0.

Answer extraction (`extract_answer`), first rule that applies:
  1. the text inside the last complete `<answer>...</answer>` pair;
  2. else the text after the last `</think>` (if not blank);
  3. else the X of the last "answer: X" / "answer is X" (case-insensitive, to the end of that line);
  4. else the last number in the completion;
  5. else None.
The result is stripped of surrounding whitespace.

Answer matching (`answers_match`): if both sides parse as numbers they match when equal within
`rel_tol`/`abs_tol` ("3.0" == "3", "1,000" == "1000", "1/2" == "0.5", "-4" == "−4"); otherwise they match
when equal as strings after normalisation (Unicode NFKC, casefold, whitespace collapsed, a wrapping
`$...$` or `\\boxed{...}` and a trailing period removed).
"""
from __future__ import annotations

import math
import re
import unicodedata
from fractions import Fraction
from typing import Callable, Iterable, Mapping, Sequence, Union

import numpy as np

Reference = Union[str, Mapping]
RewardFn = Callable[[str, str, Reference], float]

# ---------------------------------------------------------------------------------------------------
# Answer extraction
# ---------------------------------------------------------------------------------------------------

_ANSWER_PAIR = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_ANSWER_PHRASE = re.compile(r"answer\s*(?:is|:|=)\s*([^\n]*)", re.IGNORECASE)
# A sign counts only when it does not follow a word character ("10-3" ends in the number 3, not -3).
_NUMBER = re.compile(r"(?:(?<![\w.])[-+\u2212])?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?")


def extract_answer(completion: str) -> str | None:
    """The final answer in a completion, by the rule in the module docstring; None if there is none."""
    if not isinstance(completion, str):
        return None
    # 1. Last complete <answer>...</answer>: find the last closing tag, then the last opening tag before it.
    close = completion.rfind("</answer>")
    if close >= 0:
        open_ = completion.rfind("<answer>", 0, close)
        if open_ >= 0:
            return completion[open_ + len("<answer>"):close].strip()
    # 2. After the last </think>.
    think_end = completion.rfind("</think>")
    if think_end >= 0:
        tail = completion[think_end + len("</think>"):].strip()
        if tail:
            return tail
    # 3. "answer: X" / "answer is X".
    phrases = _ANSWER_PHRASE.findall(completion)
    if phrases and phrases[-1].strip():
        return phrases[-1].strip()
    # 4. Last number.
    numbers = _NUMBER.findall(completion)
    if numbers:
        return numbers[-1].strip()
    return None


# ---------------------------------------------------------------------------------------------------
# Normalisation and numeric parsing
# ---------------------------------------------------------------------------------------------------

_BOXED = re.compile(r"^\\boxed\{(.*)\}$", re.DOTALL)
_FRAC = re.compile(r"^\\d?frac\{([^{}]*)\}\{([^{}]*)\}$")
_DECIMAL = re.compile(r"^[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?$")
_THOUSANDS = re.compile(r"^[-+]?\d{1,3}(?:,\d{3})+(?:\.\d*)?$")
_MAX_NUMBER_CHARS = 64  # longer strings are not treated as numbers (keeps Fraction cheap)


def _strip_wrappers(s: str) -> str:
    s = unicodedata.normalize("NFKC", s).replace("\u2212", "-").strip()
    for _ in range(3):  # peel nested wrappers such as "$\boxed{3}$."
        before = s
        s = s.rstrip(".").strip()
        if len(s) >= 2 and s[0] == "$" and s[-1] == "$":
            s = s[1:-1].strip()
        m = _BOXED.match(s)
        if m:
            s = m.group(1).strip()
        if s == before:
            break
    return s


def normalize_answer(s: str) -> str:
    """String form used for non-numeric comparison."""
    return " ".join(_strip_wrappers(s).casefold().split())


def parse_number(s: str) -> Fraction | None:
    """An exact rational for "3", "3.0", "-1,000", "1/2", "\\frac{1}{2}", "2.5e3"; None otherwise."""
    if not isinstance(s, str):
        return None
    t = _strip_wrappers(s).replace(" ", "")
    if not t or len(t) > _MAX_NUMBER_CHARS:
        return None
    m = _FRAC.match(t)
    if m:
        t = f"{m.group(1)}/{m.group(2)}"
    if "/" in t:
        parts = t.split("/")
        if len(parts) != 2:
            return None
        num, den = (parse_number(p) for p in parts)
        if num is None or den is None or den == 0:
            return None
        return num / den
    if _THOUSANDS.match(t):
        t = t.replace(",", "")
    if not _DECIMAL.match(t):
        return None
    try:
        return Fraction(t)
    except (ValueError, ZeroDivisionError, OverflowError):
        return None


def answers_match(predicted: str | None, reference: str, *, rel_tol: float = 1e-6, abs_tol: float = 1e-9) -> bool:
    """Numeric equality within tolerance when both parse as numbers, else normalised string equality."""
    if predicted is None or not isinstance(reference, str):
        return False
    a, b = parse_number(predicted), parse_number(reference)
    if a is not None and b is not None:
        if a == b:
            return True
        diff = abs(a - b)
        return float(diff) <= max(abs_tol, rel_tol * float(max(abs(a), abs(b))))
    pred = normalize_answer(predicted)
    return bool(pred) and pred == normalize_answer(reference)


def _reference_answer(reference: Reference) -> str | None:
    if isinstance(reference, Mapping):
        reference = reference.get("answer")
    if isinstance(reference, (int, float)) and not isinstance(reference, bool):
        if isinstance(reference, float) and not math.isfinite(reference):
            return None
        reference = str(reference)
    return reference if isinstance(reference, str) else None


# ---------------------------------------------------------------------------------------------------
# The two R1-Zero rewards
# ---------------------------------------------------------------------------------------------------

def accuracy_reward(prompt: str, completion: str, reference: Reference) -> float:
    """1.0 iff `extract_answer(completion)` matches the reference answer (see `answers_match`), else 0.0."""
    ref = _reference_answer(reference)
    if ref is None:
        return 0.0
    return 1.0 if answers_match(extract_answer(completion), ref) else 0.0


_TAG = re.compile(r"</?(?:think|answer)>")
_FORMAT = re.compile(r"\s*<think>(.*)</think>\s*<answer>(.*)</answer>\s*", re.DOTALL)


def format_reward(prompt: str, completion: str, reference: Reference = None) -> float:
    """1.0 iff the completion is exactly `<think>...</think>` then `<answer>...</answer>`, else 0.0.

    Only whitespace may surround the two sections; each tag appears exactly once (so nested,
    duplicated or missing tags score 0); the answer must not be blank (the reasoning may be).
    """
    if not isinstance(completion, str):
        return 0.0
    m = _FORMAT.fullmatch(completion)
    if m is None or len(_TAG.findall(completion)) != 4:
        return 0.0
    return 1.0 if m.group(2).strip() else 0.0


# ---------------------------------------------------------------------------------------------------
# Registry and combination
# ---------------------------------------------------------------------------------------------------

_REGISTRY: dict[str, RewardFn] = {}


def register_reward(name: str, fn: RewardFn, *, overwrite: bool = False) -> RewardFn:
    """Make `fn` available as `get_reward(name)`. Re-registering a name needs overwrite=True."""
    if not callable(fn):
        raise TypeError(f"reward {name!r}: {fn!r} is not callable")
    if name in _REGISTRY and not overwrite and _REGISTRY[name] is not fn:
        raise ValueError(f"reward {name!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[name] = fn
    return fn


def get_reward(name: str) -> RewardFn:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown reward {name!r}; registered: {sorted(_REGISTRY)}") from None


def list_rewards() -> list[str]:
    return sorted(_REGISTRY)


def resolve_reward(fn: str | RewardFn) -> RewardFn:
    """A registered name or a callable -> the callable."""
    return get_reward(fn) if isinstance(fn, str) else fn


def combine_rewards(fns: Sequence[str | RewardFn], weights: Sequence[float] | None = None) -> RewardFn:
    """A reward that is `sum_k weights[k] * fns[k](...)`; names are looked up in the registry now.

    weights default to 1 each (R1-Zero: accuracy + format).
    """
    resolved = [resolve_reward(f) for f in fns]
    w = [1.0] * len(resolved) if weights is None else [float(x) for x in weights]
    if len(w) != len(resolved):
        raise ValueError(f"combine_rewards: {len(resolved)} rewards but {len(w)} weights")

    def combined(prompt: str, completion: str, reference: Reference) -> float:
        return float(sum(wk * float(f(prompt, completion, reference)) for wk, f in zip(w, resolved)))

    return combined


def score_batch(fn: str | RewardFn, prompts: Iterable[str], completions: Iterable[str],
                references: Iterable[Reference]) -> np.ndarray:
    """Rewards of a batch as float32 [N], ready for `grpo.group_advantages` after reshape to [P, G]."""
    f = resolve_reward(fn)
    prompts, completions, references = list(prompts), list(completions), list(references)
    if not len(prompts) == len(completions) == len(references):
        raise ValueError(f"score_batch: {len(prompts)} prompts, {len(completions)} completions, "
                         f"{len(references)} references")
    return np.array([f(p, c, r) for p, c, r in zip(prompts, completions, references)], np.float32)


register_reward("accuracy", accuracy_reward)
register_reward("format", format_reward)
