"""The verifier's prefix cache: what finished sessions leave in the KV cache, for prompts that start with it.

A multi-turn chat sends its whole history again each turn, and without a cache every turn prefills all
of it (about 1.3 s per 150 prompt tokens on 2 cores with the 1.5B). Here a session's target state
outlives the session: when it ENDs (or is reclaimed idle), its state and the tokens it holds stay in a
``PrefixCache``; a START takes the state (its session's own, or a cached one) that shares the longest
prefix with its prompt, truncates it there, and prefills only the rest.

States move, they are not copied: the START that takes one owns it, and the state it held before
takes its place in the cache. Bounded three ways: ``max_tokens`` in all (least recently used out
first), the engine's pool (a pass with no room evicts before it refuses anyone: ``evict``), and the
verifier's idle timeout. On llama.cpp a kept state's cells stay in the shared pool, and with flash
attention off every pass reads them (bench/crowded_pool.py measured a lone step 1.13-1.56x slower
beside 5 x 564 cells): the bound keeps that cost small, and a cache of 0 tokens turns it off.

Sessions that want the target's features (a draft head reads them for the whole prompt) neither
take nor leave states: the features of cached tokens are not kept.

Greedy output is the same with and without the cache on float32 models (the reused cells are what the
prompt's own prefill would have written, up to the engine's batch-size numerics: tests/test_greedy.py).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from . import lm

log = logging.getLogger(__name__)

MIN_REUSE = 4  # fewer shared tokens than this are not worth keeping a state for
MAX_ENTRIES = 32  # states kept at most: each holds a llama.cpp sequence id (256 in all, trees borrow them too)


def common_prefix(a: list[int], b: list[int], limit: int) -> int:
    """How many leading tokens ``a`` and ``b`` share, at most ``limit``."""
    n, top = 0, min(len(a), len(b), limit)
    while n < top and a[n] == b[n]:
        n += 1
    return n


@dataclass
class Entry:
    tokens: list[int]  # what the state holds (committed), in order
    state: lm.Session
    used: float = field(default_factory=time.monotonic)


class PrefixCache:
    """Target states of finished sessions, least recently used first, at most ``max_tokens`` in all."""

    def __init__(self, max_tokens: int):
        self.max_tokens = max(0, max_tokens)
        self.entries: list[Entry] = []  # oldest first
        self.hits = self.reused_tokens = 0

    @property
    def n_tokens(self) -> int:
        return sum(len(e.tokens) for e in self.entries)

    def put(self, tokens: list[int], state: lm.Session) -> None:
        """Keep ``state`` (holding ``tokens``) for a later prompt, or close it when it cannot be kept."""
        if len(tokens) < MIN_REUSE or len(tokens) > self.max_tokens:
            state.close()
            return
        self.entries.append(Entry(list(tokens), state))
        while self.n_tokens > self.max_tokens or len(self.entries) > MAX_ENTRIES:
            self.evict()

    def take(self, prompt: list[int], limit: int, better_than: int = 0) -> tuple[Entry, int] | None:
        """The entry sharing the longest prefix with ``prompt`` (at most ``limit`` tokens, more than
        ``better_than`` and at least MIN_REUSE), out of the cache; None when none does."""
        best, shared = None, max(better_than, MIN_REUSE - 1)
        for e in self.entries:
            n = common_prefix(e.tokens, prompt, limit)
            if n > shared:
                best, shared = e, n
        if best is None:
            return None
        self.entries.remove(best)
        self.hits, self.reused_tokens = self.hits + 1, self.reused_tokens + shared
        return best, shared

    def evict(self) -> bool:
        """Close the least recently used entry (a pass needs its room); False when there is none."""
        if not self.entries:
            return False
        e = self.entries.pop(0)
        e.state.close()
        log.debug("prefix cache: evicted a state of %d tokens (%d kept)", len(e.tokens), len(self.entries))
        return True

    def drop_idle(self, cutoff: float) -> None:
        """Close the entries unused since ``cutoff`` (time.monotonic)."""
        while self.entries and self.entries[0].used < cutoff:
            self.evict()

    def close(self) -> None:
        while self.evict():
            pass
