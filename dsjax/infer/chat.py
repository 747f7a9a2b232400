"""DeepSeek-style chat template and R1 reasoning split.

With a tokenizer that has DeepSeek's markers (V3/R1 `tokenizer.json`) the prompt reads like the released
template:   <｜begin▁of▁sentence｜>{system}<｜User｜>{user}<｜Assistant｜>{answer}<｜end▁of▁sentence｜><｜User｜>...<｜Assistant｜>
With the byte tokenizer (dsjax.train.tokenizer, ids 0 pad / 1 bos / 2 eos) it uses its own specials:
            <bos><|system|>{system}<|user|>{user}<|assistant|>{answer}<eos><|user|>...<|assistant|>
`think=True` opens the assistant turn with "<think>\\n", as R1's template does, so the model starts by
reasoning. As in R1's template, the reasoning of earlier assistant turns (up to "</think>") is dropped.
bos and the end-of-turn eos are inserted as ids, never as text, so both tokenizers behave the same.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclasses.dataclass(frozen=True)
class ChatMarkers:
    user: str
    assistant: str
    system: str  # "" = system text goes right after bos (DeepSeek)


DEEPSEEK = ChatMarkers(user="<｜User｜>", assistant="<｜Assistant｜>", system="")
BYTE = ChatMarkers(user="<|user|>", assistant="<|assistant|>", system="<|system|>")


def markers_for(tokenizer) -> ChatMarkers:
    """DeepSeek's markers when the vocabulary has them, else the byte tokenizer's specials."""
    if tokenizer.token_to_id(DEEPSEEK.user) is not None and tokenizer.token_to_id(DEEPSEEK.assistant) is not None:
        return DEEPSEEK
    return BYTE


def _answer_only(content: str) -> str:
    return content.split(THINK_CLOSE)[-1].strip() if THINK_CLOSE in content else content


def encode_chat(messages: Sequence[Mapping[str, str]], tokenizer, *, add_generation_prompt: bool = True,
                think: bool = False) -> list[int]:
    """messages: [{"role": "system"|"user"|"assistant", "content": str}, ...] -> prompt token ids."""
    mk = markers_for(tokenizer)
    parts: list[str | int] = [tokenizer.bos_id]
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content", "")
        if role == "system":
            parts.append(mk.system + content)
        elif role == "user":
            parts.append(mk.user + content)
        elif role == "assistant":
            parts += [mk.assistant + _answer_only(content), tokenizer.eos_id]
        else:
            raise ValueError(f"message {i}: role must be system, user or assistant, got {role!r}")
    if add_generation_prompt:
        parts.append(mk.assistant + (THINK_OPEN + "\n" if think else ""))
    ids: list[int] = []
    for p in parts:
        ids += [p] if isinstance(p, int) else tokenizer.encode(p)
    return ids


def chat_prompt(user: str, tokenizer, *, system: str | None = None, think: bool = False) -> list[int]:
    """One user turn (optionally after a system prompt), ready for the assistant to answer."""
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return encode_chat(msgs, tokenizer, think=think)


def split_reasoning(text: str, *, opened: bool = False) -> tuple[str, str]:
    """(reasoning, answer) of an R1-style completion.

    "<think>r</think>a" -> (r, a). With opened=True the prompt already ended with "<think>", so text
    before "</think>" is reasoning even without an opening tag, and text with no "</think>" at all is
    unfinished reasoning (answer ""). Without any think tag the whole text is the answer."""
    if THINK_CLOSE in text:
        reasoning, answer = text.split(THINK_CLOSE, 1)
        if THINK_OPEN in reasoning:
            reasoning = reasoning.split(THINK_OPEN, 1)[1]
        return reasoning.strip(), answer.strip()
    if THINK_OPEN in text:
        return text.split(THINK_OPEN, 1)[1].strip(), ""
    if opened:
        return text.strip(), ""
    return "", text.strip()
