"""Reuse of computed latent caches across requests that share a prompt prefix.

Because attention is causal, the cache entries of the first m tokens of any prompt depend only on those
m tokens. So every stored prompt serves every later prompt that shares a prefix with it, of any length:
`lookup` returns the longest common prefix over all stored prompts. A request then starts from a copy
of those entries and prefills only its suffix. Entries live on the host (numpy), one per prompt,
evicted least-recently-used by count.
"""
from __future__ import annotations

import collections

import numpy as np


class PrefixCache:
    def __init__(self, max_entries: int = 16, min_match: int = 1):
        self.max_entries = max_entries
        self.min_match = min_match
        self._entries: collections.OrderedDict[tuple[int, ...], dict] = collections.OrderedDict()
        self.hits = 0  # lookups that found a usable prefix
        self.reused_tokens = 0  # prompt tokens not recomputed thanks to the cache

    def __len__(self):
        return len(self._entries)

    def __contains__(self, tokens) -> bool:
        return tuple(int(t) for t in tokens) in self._entries

    def insert(self, tokens, entries: dict) -> None:
        """entries: {stack: {"c": [layers, len, r], "k_pe": [layers, len, rope]}} for exactly these tokens."""
        key = tuple(int(t) for t in tokens)
        self._entries[key] = {k: {n: np.asarray(a) for n, a in v.items()} for k, v in entries.items()}
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def lookup(self, tokens, max_len: int | None = None) -> tuple[int, dict | None]:
        """(m, entries) for the longest prefix of `tokens` (at most max_len) that a stored prompt shares."""
        q = np.asarray(tokens, np.int64)
        limit = len(q) if max_len is None else min(len(q), max_len)
        best, best_key = 0, None
        for key in self._entries:
            k = np.asarray(key[:limit], np.int64)
            diff = np.nonzero(k != q[: len(k)])[0]
            m = int(diff[0]) if len(diff) else len(k)
            if m > best:
                best, best_key = m, key
        if best < self.min_match:
            return 0, None
        self._entries.move_to_end(best_key)
        self.hits += 1
        self.reused_tokens += best
        e = self._entries[best_key]
        return best, {k: {n: a[:, :best] for n, a in v.items()} for k, v in e.items()}
