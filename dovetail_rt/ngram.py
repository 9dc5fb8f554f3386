"""Drafts that cost the CPU nothing: prompt lookup in the context, and a suffix index of earlier outputs.

The draft is the text itself (prompt lookup, as in transformers' prompt-lookup candidate generator,
vLLM's n-gram proposer and llama.cpp's ngram-* speculative types; across requests, SuffixDecoding):

1. match: the longest n (``n_max`` down to 1) such that the context's last n tokens occurred
   before, in the context or in an earlier output kept by the ``SuffixIndex``;
2. continuations: what followed each occurrence of that n-gram (the most recent ``SCAN`` per source),
   never past the end of its sequence;
3. tree: the continuations merged into a trie; a node's count is how many occurrences continue
   through it, siblings ranked by count (ties: the most recent first); a node's own chance is its
   count over the number of occurrences;
4. size: each match length has its own cost model (a 2-token match and an 8-token one are accepted
   at very different rates), which calibrates those chances per depth from what the target
   accepted and keeps the nodes that raise the expected tokens per second (cost.py).

No model and no tokenizer: token ids only. A step's lookup takes tens of microseconds (the stats
report it per draft kind).
"""

from __future__ import annotations

import math
import threading
import time
from collections import defaultdict, deque
from contextlib import nullcontext
from dataclasses import dataclass, field

from . import tree
from .config import DraftConfig
from .cost import PROBE_EVERY, PROBE_MAX, CostModel, flat_width, sized
from .tree import DraftTree

SCAN = 64  # occurrences looked at per source and step, the most recent first
TOP_K = 3  # branching of lookup trees on a steep curve, unless --tree-top-k says otherwise
INDEX_TOKENS = 1 << 16  # default size cap of the suffix index of earlier outputs


SEP = -1  # between the outputs in a SuffixIndex: no match or continuation crosses it


class TokenIndex:
    """One token sequence (a context that grows, or the outputs of a SuffixIndex end to end) and,
    for every token and every pair of tokens in it, the positions that follow its occurrences.
    Positions before ``first`` are forgotten (evicted outputs)."""

    def __init__(self, tokens=()):
        self.tokens: list[int] = []
        self.first = 0
        self.after1: dict[int, list[int]] = defaultdict(list)
        self.after2: dict[tuple[int, int], list[int]] = defaultdict(list)
        self.extend(tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    def extend(self, new) -> None:
        for tok in new:
            i = len(self.tokens)
            self.tokens.append(tok)
            self.after1[tok].append(i + 1)
            if i:
                self.after2[(self.tokens[i - 1], tok)].append(i + 1)

    def matches(self, tail: list[int], n_min: int, n_max: int, end: int | None = None) -> tuple[int, list[int]]:
        """(n, continuation starts) of the longest matches of ``tail``'s last n tokens, n_min <= n <= n_max,
        most recent first, each with at least one token after it and starting before ``end`` (default:
        the sequence's end); (0, []) when none."""
        toks, best, found = self.tokens, 0, []
        end = len(toks) if end is None else end
        if len(tail) >= 2 and n_max >= 2:
            for pos in reversed(self.after2.get((tail[-2], tail[-1]), ())[-SCAN - 1:]):
                if pos >= end or pos - 2 < self.first or toks[pos] == SEP:
                    continue  # nothing follows it (the tail itself, an output's end), or forgotten
                n = 2
                while n < n_max and n < pos and n < len(tail) and toks[pos - 1 - n] == tail[-1 - n]:
                    n += 1
                if n > best:
                    best, found = n, [pos]
                elif n == best:
                    found.append(pos)
        if not found and n_min <= 1 and tail:
            best, found = 1, [p for p in reversed(self.after1.get(tail[-1], ())[-SCAN - 1:])
                              if self.first < p < end and toks[p] != SEP]
        return (best, found) if found and best >= n_min else (0, [])

    def continuation(self, pos: int, depth: int) -> list[int]:
        """Up to ``depth`` tokens from ``pos``, never past the sequence's (or its output's) end."""
        out = self.tokens[pos : pos + depth]
        return out[: out.index(SEP)] if SEP in out else out


class SuffixIndex:
    """Earlier outputs of the same target, end to end in one ``TokenIndex`` (so one lookup searches
    them all), shared by every lookup draft holding this index (the ``Lookup`` object: one per
    draft-side process unless you open several). Bounded: past ``max_tokens`` the oldest outputs are
    forgotten whole (rebuilt without them once they are half of what is stored); an output longer than
    the cap keeps its end."""

    def __init__(self, max_tokens: int = INDEX_TOKENS):
        if max_tokens < 0:
            raise ValueError(f"the lookup index size must be >= 0 tokens, got {max_tokens}")
        self.max_tokens, self.n_tokens = max_tokens, 0
        self.index = TokenIndex()
        self.lengths: deque[int] = deque()  # of the outputs kept, oldest first
        self.lock = threading.Lock()  # Clients in several threads (a server's requests) share one index

    def add(self, tokens: list[int]) -> None:
        tokens = list(tokens)[-self.max_tokens:] if self.max_tokens else []
        if len(tokens) < 2:
            return
        with self.lock:
            self._add(tokens)

    def _add(self, tokens: list[int]) -> None:
        self.index.extend([SEP, *tokens])
        self.lengths.append(len(tokens))
        self.n_tokens += len(tokens)
        while self.n_tokens > self.max_tokens:
            n = self.lengths.popleft()
            self.n_tokens -= n
            self.index.first += n + 1
        if self.index.first > len(self.index) // 2:  # forget for good: rebuild from the outputs kept
            self.index = TokenIndex(self.index.tokens[self.index.first:])

    def outputs(self) -> list[list[int]]:
        """The outputs kept, oldest first."""
        with self.lock:
            live = self.index.tokens[self.index.first:]
        out, at = [], 0
        for n in self.lengths:
            at += 1  # its SEP
            out.append(live[at : at + n])
            at += n
        return out


@dataclass
class Lookup:
    """What ``open_draft("ngram")`` gives: the lookup draft's only state beyond a session, its index
    of earlier outputs. Share one between Clients to share what they produced (a server's requests)."""

    index: SuffixIndex = field(default_factory=SuffixIndex)


def lookup(context: TokenIndex, index: SuffixIndex | None, n_min: int, n_max: int, depth: int,
           skip: int = 0) -> tuple[int, list[list[int]]]:
    """(match length, continuations up to ``depth`` tokens, most recent first within each source): the
    longest match of the context's tail in the context itself, then in the ``index`` of earlier outputs.
    ``skip``: match the tail without its last token and continue after the token the source has in its
    place (a one-token substitution: an edit renamed it), or right there (an insertion): ``resume``."""
    tail = context.tokens[-n_max - skip : len(context) - skip]
    best, conts = 0, []
    for src in [context] + ([index] if index is not None else []):
        with src.lock if src is index else nullcontext():
            found = src.index if src is index else src  # the index is swapped on a rebuild: read it once
            # not the tail itself: with ``skip``, the context's last token follows the tail's match there
            n, starts = found.matches(tail, max(n_min, best, 1), n_max, len(found) - skip if found is context else None)
            if n > best:
                best, conts = n, []
            if n and n == best:
                starts = starts[: SCAN - len(conts)]
                if skip:  # substitution first (after the source's own token), then insertion (at it)
                    starts = [q for p in starts for q in (p + 1, p)]
                conts += [c for c in (found.continuation(p, depth) for p in starts) if c]
    return (best, conts) if conts else (0, [])


RESUME = 0  # the run-length bucket of drafts that resume a copy after an edit (``resume``)
RESUME_MIN = 3  # tokens before the edited one that must match for a resume


def resume(context: TokenIndex, index: SuffixIndex | None, n_max: int, depth: int) -> tuple[int, list[list[int]]]:
    """After an edit, where the copy goes on: the context's tail before its last token, matched
    (at least RESUME_MIN tokens) anywhere in the context and earlier outputs, and what follows the
    token the source has in the last token's place (a rename) or what follows the match itself (an
    inserted token). -> (match length, continuations), as ``lookup``."""
    if len(context) <= RESUME_MIN:
        return 0, []
    return lookup(context, index, RESUME_MIN, n_max, depth, skip=1)



def trie(continuations: list[list[int]], top_k: int) -> tuple[list[int], list[int], list[int]]:
    """Continuations merged into a trie, in wire layout (``parents[i - 1]`` of node i, 0 = the root; a
    parent before its children): at every node its ``top_k`` most frequent children, best first,
    ties to the one seen first. -> (tokens, parents, counts: occurrences continuing through each node)."""
    children: dict[int, dict[int, int]] = defaultdict(dict)  # pool node -> token -> pool node
    tok, count = [0], [len(continuations)]
    for cont in continuations:
        node = 0
        for t in cont:
            nxt = children[node].get(t)
            if nxt is None:
                nxt = children[node][t] = len(tok)
                tok.append(t), count.append(0)
            count[nxt] += 1
            node = nxt
    tokens, parents, counts = [], [], []
    stack = [(0, 0)]  # (pool node, its wire id)
    while stack:  # preorder, best sibling first
        node, wire = stack.pop()
        ranked = sorted(children[node].values(), key=lambda c: -count[c])[:top_k]  # stable: first seen wins ties
        ids = []
        for c in ranked:
            tokens.append(tok[c]), parents.append(wire), counts.append(count[c])
            ids.append(len(tokens))
        stack += reversed(list(zip(ranked, ids)))
    return tokens, parents, counts


def bucket(n: int) -> int:
    """Match lengths that share one acceptance estimate: 1, 2, 3, 4-7, 8+."""
    return n if n <= 3 else (4 if n < 8 else 8)


DECAY = 0.9  # per step a match length drafts: the last ~10 such steps count
# Priors per match-length bucket, worth PRIOR_STEPS steps: (first, rate) measured with every proposal
# sent whole, on prompts outside the bench's slices (Q4_K_M target, 2-core AMD EPYC Zen 5, session 15):
#   python bench/lookup_rates.py humaneval-edit:100:110:200 humaneval-review:100:110:200 mtbench:60:70:128
#   -> (steps, first, rate), cumulative: resume (144, 0.16, 0.69), 1 (647, 0.17, 0.56), 2 (274, 0.42, 0.79),
#      3 (49, 0.61, 0.81), 4-7 (49, 0.86, 0.90), 8+ (129, 0.98, 0.99); the edits alone: resume first 0.25-0.28
PRIOR_RATES = {RESUME: (0.2, 0.7), 1: (0.2, 0.55), 2: (0.45, 0.8), 3: (0.6, 0.8), 4: (0.85, 0.9), 8: (0.95, 0.98)}
PRIOR_STEPS = 4.0


@dataclass
class RunLength:
    """How far the lookup's drafts after a match of one length get accepted, in two numbers. ``first``:
    the chance that the draft's first token is (the match is right at all). ``rate``: the chance that
    each next one is, given the one before (a copy goes on until the text departs from what it
    copies: a geometric run). So a node ``d`` deep is reached with ``first * rate ** (d - 1)``. The two
    differ most on edits: a short match is often wrong, but once one is right the copy runs on.

    Learned from the path the target accepted: a step that reached a leaf of the tree it was sent
    (a branch accepted whole, however short) is a hit for ``rate``, one that stopped before is a
    miss; estimates are decayed hit / try counts. Probes as in cost.py: when nothing was sent for
    ``probe_every`` proposals in a row, one token is."""

    first_hits: float
    first_tries: float
    hits: float
    misses: float
    idle: int = 0
    probe_every: int = PROBE_EVERY

    @classmethod
    def prior(cls, first: float, rate: float, steps: float = PRIOR_STEPS) -> "RunLength":
        return cls(steps * first, steps, steps * rate, steps * (1 - rate))

    @property
    def first(self) -> float:
        return self.first_hits / self.first_tries

    @property
    def rate(self) -> float:
        return self.hits / (self.hits + self.misses)

    def chance(self, depth: int) -> float:
        """That a draft node ``depth`` deep (1: the first token) is accepted."""
        return self.first * self.rate ** (depth - 1)

    @property
    def probing(self) -> bool:
        return self.idle >= self.probe_every

    def observe(self, sent: bool, accepted: int = 0, whole: bool = False) -> None:
        """A step that ``sent`` a draft (False: nothing) and had ``accepted`` tokens accepted, ``whole``
        if they end at one of its leaves."""
        if not sent:
            self.idle += 1
            return
        self.probe_every = min(2 * self.probe_every, PROBE_MAX) if self.probing else PROBE_EVERY
        self.idle = 0
        self.first_hits, self.first_tries = DECAY * self.first_hits + (accepted > 0), DECAY * self.first_tries + 1
        if accepted:  # the first token's chance is counted above: the rest is the run's
            self.hits = DECAY * self.hits + accepted - 1
            self.misses = DECAY * self.misses + (not whole)


class NgramDrafter:
    """``-md ngram``: prompt lookup in the session's context plus a ``SuffixIndex`` of earlier outputs.
    A node's chance of acceptance is its share of the occurrences times first * rate^(depth - 1) (``RunLength`` of
    the match's length); the draft sent is the set of nodes that maximises expected tokens per second
    on the verifier's measured curve (``CostModel.tree_size``)."""

    wants_features = False
    max_positions = 1 << 30
    kind = "ngram"
    resumes = True  # resume copies after an edit (``resume``); off for comparisons

    def __init__(self, source: Lookup, config: DraftConfig, verify_curve: dict | None = None):
        self.source, self.config = source, sized(config, verify_curve)
        # where verifying many tokens costs about what one does, every distinct continuation may go in the tree
        self.top_k = config.tree_top_k or max(TOP_K, flat_width(verify_curve))
        self.verify = CostModel(verify_curve)  # T_V(q), prior from the curve, learned from every step
        self.runs = {b: RunLength.prior(first, rate) for b, (first, rate) in PRIOR_RATES.items()}
        self.context = TokenIndex()
        self.n_prompt = 0
        self.last: tuple[int, DraftTree] | None = None  # (match bucket, draft sent) of the last proposal
        self.copying = True  # a copy may be going on (a generation may start mid-copy): an edit can break it

    def close(self) -> None:
        self.reset()

    def finish(self, committed: list[int]) -> None:
        """The generation is over: its whole output, the last accepted batch included, joins the index."""
        n = len(self.context)
        if n and committed[n - 1 : n] == self.context.tokens[-1:]:
            self.context.extend(committed[n:])
        self.reset()

    def reset(self) -> None:
        """A generation starts (or ends): what the last one output joins the index of earlier outputs."""
        if len(self.context) > self.n_prompt:
            self.source.index.add(self.context.tokens[self.n_prompt:])
        self.context, self.n_prompt, self.last, self.copying = TokenIndex(), 0, None, True

    def observe(self, feedback) -> None:
        if feedback.verify_s:  # 0: the step was another draft kind's (Chooser), its timing not ours
            self.verify.observe_pass(feedback.n_drafted + 1, feedback.rows, feedback.verify_s)
        if self.last is not None:
            b, sent = self.last
            if not (len(sent) and feedback.verify_s):
                self.runs[b].observe(False)
            else:
                self.runs[b].observe(True, feedback.n_accepted, tree.is_leaf(sent, tree.walk(sent, feedback.accepted)))
        self.last = None

    def propose(self, committed: list[int], budget: int) -> DraftTree:
        started, cfg = time.perf_counter(), self.config
        if not len(self.context):
            self.n_prompt = len(committed) - 1  # the prompt; the rest of ``committed`` is output
        if len(committed) < len(self.context) or committed[len(self.context) - 1 : len(self.context)] != self.context.tokens[-1:]:
            raise ValueError("the committed tokens no longer extend this generation's: reset() between generations")
        self.context.extend(committed[len(self.context):])
        cap = min(budget, cfg.draft_max)
        n, conts = lookup(self.context, self.source.index, cfg.lookup_min, cfg.lookup_max, cap) if cap > 0 else (0, [])
        key = bucket(n)
        # a weak match or none right after a copy (the last proposal matched RESUME_MIN tokens or more, or the
        # generation's first): maybe an edit broke it; in chat, where nothing was being copied, never tried
        if cap > 0 and n < 2 and self.copying and self.resumes:
            n_resumed, resumed = resume(self.context, self.source.index, cfg.lookup_max, cap)
            if n_resumed > n + 1:
                n, conts, key = n_resumed, resumed, RESUME
        self.copying = n >= RESUME_MIN
        if not n:
            return DraftTree.chain([], kind=self.kind)
        tokens, parents, counts = trie(conts, self.top_k)
        scores = [math.log(c / len(conts)) for c in counts]
        draft = tree.prune(DraftTree(tokens, parents, scores, self.kind), cap)
        run, depths = self.runs[key], tree.depths(draft.parents)
        if cfg.adaptive and self.verify.knows_verify:
            chances = [math.exp(s) * run.chance(d) for s, d in zip(draft.scores, depths)]
            keep = max(self.verify.tree_size(chances, time.perf_counter() - started), int(run.probing))
            draft = tree.prune(draft, keep, chances)
        self.last = (key, draft)
        return draft
