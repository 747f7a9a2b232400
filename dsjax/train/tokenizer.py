"""Tokenizers behind one small interface: a byte-level fallback and a Hugging Face `tokenizer.json`.

The byte tokenizer exists so that the embedded corpus and the tiny test models (vocab_size 512) need no
downloaded vocabulary; its ids are fixed forever because checkpoints depend on them:

    0 = <pad>, 1 = <bos>, 2 = <eos>, 3..258 = bytes 0x00..0xff,
    259.. = <think>, </think>, <answer>, </answer>, <|user|>, <|assistant|>, <|system|>,
    the rest up to 511 reserved (decode to nothing).

Both tokenizers expose `encode(text) -> list[int]` (no bos/eos added: the data pipeline adds them),
`decode(ids) -> str`, `vocab_size`, `bos_id`, `eos_id`, `pad_id` and `token_to_id(str)`.
"""
from __future__ import annotations

import json
import os
import re
from typing import Iterable, Protocol

from dsjax.errors import DataError


class TokenizerError(DataError):
    """A tokenizer file is missing or unusable. The message names the file."""


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def token_to_id(self, token: str) -> int | None: ...


BYTE_SPECIALS = ("<think>", "</think>", "<answer>", "</answer>", "<|user|>", "<|assistant|>", "<|system|>")


class ByteTokenizer:
    """UTF-8 bytes shifted by 3, plus the chat/reasoning specials. Lossless on any text."""

    pad_id, bos_id, eos_id = 0, 1, 2
    byte_offset = 3
    vocab_size = 512

    def __init__(self):
        first = self.byte_offset + 256
        self._special_ids = {s: first + i for i, s in enumerate(BYTE_SPECIALS)}
        self._id_special = {i: s for s, i in self._special_ids.items()}
        # Longest first, so that a special that is a prefix of another can never shadow it.
        alts = sorted(BYTE_SPECIALS, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(re.escape(s) for s in alts) + ")")

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        # re.split with a capture group alternates plain text (even) and specials (odd).
        for k, part in enumerate(self._split.split(text)):
            if k % 2:
                ids.append(self._special_ids[part])
            elif part:
                ids.extend(b + self.byte_offset for b in part.encode("utf-8"))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        out, buf = [], bytearray()
        for i in ids:
            i = int(i)
            if self.byte_offset <= i < self.byte_offset + 256:
                buf.append(i - self.byte_offset)
                continue
            if i in self._id_special:
                out.append(buf.decode("utf-8", errors="replace"))
                buf = bytearray()
                out.append(self._id_special[i])
            # pad / bos / eos / reserved ids carry no text.
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def token_to_id(self, token: str) -> int | None:
        named = {"<pad>": self.pad_id, "<bos>": self.bos_id, "<eos>": self.eos_id}
        if token in named:
            return named[token]
        if token in self._special_ids:
            return self._special_ids[token]
        b = token.encode("utf-8")
        return b[0] + self.byte_offset if len(b) == 1 else None


# Spellings used by common checkpoints (DeepSeek-V3 first), tried when tokenizer_config.json is absent.
_BOS_NAMES = ("<｜begin▁of▁sentence｜>", "<s>", "<|begin_of_text|>", "<bos>", "[BOS]", "<|endoftext|>")
_EOS_NAMES = ("<｜end▁of▁sentence｜>", "</s>", "<|end_of_text|>", "<eos>", "[EOS]", "<|endoftext|>")
_PAD_NAMES = ("<｜▁pad▁｜>", "<pad>", "[PAD]", "<|pad|>")


class HFTokenizer:
    """A `tokenizers.Tokenizer` loaded from `tokenizer.json` (a file, or a directory holding one).

    bos/eos/pad come from the explicit arguments, else `tokenizer_config.json` beside the file, else
    the first known spelling present in the vocabulary; pad falls back to eos (padding is masked by
    segment id 0 anyway, so its id only has to be valid).
    """

    def __init__(self, path: str, *, bos: str | None = None, eos: str | None = None, pad: str | None = None):
        from tokenizers import Tokenizer as _HF

        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise TokenizerError(f"{path}: tokenizer file not found")
        try:
            self._tok = _HF.from_file(path)
        except Exception as e:  # noqa: BLE001 — the Rust error text is the useful part
            raise TokenizerError(f"{path}: cannot load tokenizer: {e}") from e
        self.path = path
        conf = _read_tokenizer_config(os.path.join(os.path.dirname(path), "tokenizer_config.json"))
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        self.bos_id = self._resolve(bos or conf.get("bos_token"), _BOS_NAMES, "bos")
        self.eos_id = self._resolve(eos or conf.get("eos_token"), _EOS_NAMES, "eos")
        try:
            self.pad_id = self._resolve(pad or conf.get("pad_token"), _PAD_NAMES, "pad")
        except TokenizerError:
            self.pad_id = self.eos_id

    def _resolve(self, name: str | None, fallbacks: tuple[str, ...], what: str) -> int:
        for cand in ((name,) if name else fallbacks):
            i = self._tok.token_to_id(cand)
            if i is not None:
                return int(i)
        tried = name if name else ", ".join(fallbacks)
        raise TokenizerError(f"{self.path}: no {what} token in the vocabulary (tried {tried}); pass {what}=...")

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        i = self._tok.token_to_id(token)
        return None if i is None else int(i)


def _read_tokenizer_config(path: str) -> dict:
    """Special-token names from an HF `tokenizer_config.json` ({"content": ...} or plain strings)."""
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: cannot read tokenizer config: {e}") from e
    out = {}
    for k in ("bos_token", "eos_token", "pad_token"):
        v = raw.get(k)
        if isinstance(v, dict):
            v = v.get("content")
        if isinstance(v, str):
            out[k] = v
    return out


def load_tokenizer(path: str | None) -> ByteTokenizer | HFTokenizer:
    """None (or "bytes") -> the byte tokenizer; otherwise a tokenizer.json file or its directory."""
    if path is None or path in ("", "bytes", "byte"):
        return ByteTokenizer()
    return HFTokenizer(path)
