"""The draft side's proposers. A drafter turns the committed tokens into a draft tree.

Every draft kind is a :class:`Drafter` (the calls the loop in ``client.py`` makes, so it never changes).
Kinds: ``DraftLM`` (a small LM), ``HeadDrafter`` (the Dovetail feature head), ``ngram.NgramDrafter``
(lookup in the context and earlier outputs), ``Chooser`` (ngram+DRAFT: the lookup when it pays, else
the model draft) and ``NoDraft``. ``draft_kinds.py`` is the one place a draft kind is named, opened
and built from a spec.
"""

from __future__ import annotations

import math
import time

from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

import torch

from . import lm, ngram, tree
from .config import DraftConfig
from .cost import CostModel, raw_chances_by_depth, sized
from .tree import DraftTree


@dataclass
class Feedback:
    """What one verifier reply tells the draft side."""

    features: torch.Tensor | None = None  # [n, hidden] float16 target features, when asked for
    n_drafted: int = 0
    n_accepted: int = 0
    verify_s: float = 0.0
    draft_s: float = 0.0
    rows: int = 0  # tokens in the verifier pass, every session's (0: this step's own)
    accepted: tuple[int, ...] = ()  # the accepted draft tokens (the path taken through a tree)


def size_tree(draft: DraftTree, cost: CostModel, config: DraftConfig, started: float) -> tuple[DraftTree, list[float]]:
    """Cut a grown tree to the size the cost model prefers (unless adaptive is off); returns it
    and the draft's own chances per depth, which calibrate the next estimates."""
    if config.adaptive and cost.knows_verify:
        chances = cost.node_chances(draft.scores, draft.parents)
        draft = tree.prune(draft, cost.tree_size(chances, time.perf_counter() - started), chances)
    return draft, raw_chances_by_depth(draft.scores, draft.parents)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@runtime_checkable
class Drafter(Protocol):
    """What the client loop asks of every draft kind (``ngram.NgramDrafter`` meets it without a model)."""

    kind: str  # "lm", "head", "ngram", "none": the stats per kind
    wants_features: bool  # the target's last-layer features must come back with every RESULT
    max_positions: int  # the longest sequence the draft can hold
    config: DraftConfig  # settings for the next proposals (a server request sets its own)

    def propose(self, committed: list[int], budget: int) -> DraftTree:
        """A draft tree of at most ``budget`` nodes after ``committed`` (every token so far)."""

    def observe(self, feedback: Feedback) -> None:
        """What the last step gave: features of the newly committed tokens, counts and timings."""

    def reset(self) -> None:
        """A new generation starts."""

    def finish(self, committed: list[int]) -> None:
        """The generation is over with these tokens (a lookup keeps its output; the others keep nothing)."""

    def close(self) -> None:
        """Free the draft's state; the model stays its opener's."""


class NoDraft(Drafter):
    """Proposes nothing: every step is one plain target decode step."""

    wants_features = False
    max_positions = 1 << 30
    kind = "none"
    config = DraftConfig(draft_max=0, tree_tokens=2)  # never read: it drafts nothing

    def close(self) -> None:
        pass

    def reset(self) -> None:
        pass

    def observe(self, feedback: Feedback) -> None:
        pass

    def propose(self, committed: list[int], budget: int) -> DraftTree:
        return DraftTree.chain([])


class DraftLM(Drafter):
    """A standalone small LM that shares the target's tokenizer (e.g. Qwen2.5-Coder-0.5B), on any
    engine behind the ``lm`` seam.

    Its state holds a prefix of the committed tokens, then the last chain it drafted (pending); each
    round it keeps the drafted tokens the target accepted, runs the committed tokens it lacks, then
    drafts greedily (deterministic drafts: no probabilities cross the wire). Chains are as long as
    the cost model says pays off (expected tokens/s from the measured verification curve, draft time
    and acceptance), capped by draft_max; until it has its measurements, the draft's confidence
    (p_min) decides.
    """

    wants_features = False
    kind = "lm"

    def __init__(self, model: lm.LM, config: DraftConfig, verify_curve: dict | None = None):
        self.lm, self.config = model, sized(config, verify_curve)
        self.cost = CostModel(verify_curve)
        self.last_predicted: list[float] = []  # the last draft's own chances per depth
        self.max_positions = model.info.max_positions
        self.state = model.session()
        self.reset()

    def close(self) -> None:
        self.state.close()

    def reset(self) -> None:
        self.catch_up = (0.0, 0)  # the last catch-up's seconds and tokens
        self.state.truncate(0)
        self.cached: list[int] = []  # committed tokens in the state
        self.drafted: list[int] = []  # the pending chain after them (the last draft)

    def observe(self, feedback: Feedback) -> None:
        _note_step(self, feedback)

    @torch.inference_mode()
    def propose(self, committed: list[int], budget: int) -> DraftTree:
        started = time.perf_counter()
        cfg = self.config
        behind = len(committed) - len(self.cached)  # what a catch-up would run now (the prompt, at first)
        if budget <= 0 or (cfg.adaptive and not self.cost.worth_drafting(
                cfg.draft_max, cfg.tree_tokens if cfg.is_tree else None, behind)):
            return DraftTree.chain([])  # drafting off this step: the draft does not even catch up
        logits = self._catch_up(committed)  # [vocab] after the last committed token
        if self.config.is_tree:
            draft, self.last_predicted = size_tree(self._tree(committed, logits, budget), self.cost, self.config, started)
            return replace(draft, kind=self.kind)
        return self._chain(logits, budget)

    def _catch_up(self, committed: list[int]) -> torch.Tensor:
        held = self.cached + self.drafted
        n = min(common_prefix(held, committed), len(committed) - 1)  # rerun >= 1 token for its logits
        if n > len(self.cached):  # accepted draft tokens stay in the cache
            self.state.keep(list(range(n - len(self.cached))))
        self.state.truncate(n)
        new = committed[n:]
        t0 = time.perf_counter()
        out = self.state.forward(new, logits_for=1)
        self.catch_up = (time.perf_counter() - t0, len(new))  # seconds, tokens run
        self.state.keep(list(range(len(new))))
        self.cached, self.drafted = list(committed), []
        return out.logits[-1]

    def _chain(self, logits: torch.Tensor, budget: int) -> DraftTree:
        """Greedy chain, extended while one more token raises the expected tokens per second."""
        cfg, cost = self.config, self.cost
        tokens, scores, p_all = [], [], []  # p_all[j]: estimated P(first j+1 tokens accepted)
        while len(tokens) < min(budget, cfg.draft_max):
            logp = logits.float().log_softmax(-1)
            lp, tok = (t.item() for t in logp.max(-1))
            score = (scores[-1] if scores else 0.0) + lp
            p_next = min(p_all[-1] if p_all else 1.0, math.exp(score) * cost.calibration(len(tokens) + 1))
            if len(tokens) >= cfg.draft_min:
                if cost.ready and cfg.adaptive:
                    if not cost.extend_chain(p_all, p_next):
                        break
                elif lp < _log(cfg.p_min):
                    break
            tokens.append(tok)
            scores.append(score)
            p_all.append(p_next)
            if len(tokens) < min(budget, cfg.draft_max):
                logits = self.state.forward([tok]).logits[-1]  # continues the pending chain
                self.drafted.append(tok)
        self.last_predicted = [math.exp(sc) for sc in scores]
        return DraftTree.chain(tokens, scores, self.kind)

    def _tree(self, committed: list[int], logits: torch.Tensor, budget: int) -> DraftTree:
        """EAGLE-2 dynamic tree; each expansion is one draft forward of pending nodes below their parents."""
        cfg = self.config
        slot: dict[int, int] = {}  # pool node -> its pending index in the state (the root is committed)

        def expand(nodes, tokens, parents, depths) -> torch.Tensor:
            first = len(slot)
            pending_parents = [-1 if parents[n] == 0 else slot[parents[n]] for n in nodes]  # 0: the root, committed
            out = self.state.forward([tokens[n] for n in nodes], pending_parents)
            slot.update({n: first + i for i, n in enumerate(nodes)})
            return out.logits.float().log_softmax(-1)  # [len(nodes), vocab]

        draft = tree.grow(logits.float().log_softmax(-1), expand, cfg.tree_top_k, cfg.tree_depth,
                          min(cfg.tree_tokens, budget + 1))
        self.state.truncate(len(committed))
        return draft


@dataclass(frozen=True)
class Choice:
    """What ``open_draft("ngram+DRAFT")`` gives: the lookup and the model draft to choose between."""

    lookup: ngram.Lookup
    model: object  # what open_draft gives for DRAFT


class Chooser(Drafter):
    """``ngram+DRAFT``: each step the lookup's proposal when it has one that its cost model expects
    to pay, else the model draft's (which drafts nothing when nothing pays either). Each kind learns
    its acceptance and draft time from the steps it drafted; the model draft sees every step's target
    features (a head needs them all) and catches up over the tokens the lookup got accepted."""

    kind = "ngram+"  # each proposal carries the kind that made it

    def __init__(self, lookup: "ngram.NgramDrafter", model):
        self.lookup, self.model, self.used = lookup, model, model
        self.wants_features = model.wants_features
        self.max_positions = model.max_positions

    @property
    def config(self) -> DraftConfig:
        return self.lookup.config

    @config.setter
    def config(self, config: DraftConfig) -> None:  # both kinds draft with the same settings
        self.lookup.config = self.model.config = config

    def close(self) -> None:
        self.lookup.close(), self.model.close()

    def reset(self) -> None:
        self.lookup.reset(), self.model.reset()

    def finish(self, committed: list[int]) -> None:
        self.lookup.finish(committed)

    def observe(self, feedback: Feedback) -> None:
        other = self.model if self.used is self.lookup else self.lookup
        self.used.observe(feedback)
        other.observe(Feedback(feedback.features))  # features only: that step's counts and times are not its own

    def propose(self, committed: list[int], budget: int) -> DraftTree:
        draft = self.lookup.propose(committed, budget)
        self.used = self.lookup if len(draft) else self.model
        return draft if len(draft) else self.model.propose(committed, budget)


def _note_step(drafter, feedback: Feedback) -> None:
    """A model draft's (DraftLM, HeadDrafter) cost model learns from the step just verified."""
    if feedback.n_drafted or feedback.verify_s:
        drafter.cost.observe(feedback.n_drafted, feedback.n_accepted, drafter.last_predicted,
                             feedback.verify_s, feedback.draft_s, drafter.catch_up, feedback.rows)
    drafter.catch_up = (0.0, 0)


def _log(p: float) -> float:
    return float("-inf") if p <= 0 else math.log(p)


HEAD_TOP_K = 4  # heads draft trees unless told --tree-top-k 1


class HeadDrafter(Drafter):
    """The Dovetail feature head: drafts from the target's own last-layer features.

    The head's KV cache holds one entry per committed *pair* (feature f_i, token x_{i+1}), built
    from the true target features the verifier sends back; draft-tree entries use the head's own
    predicted features and are dropped after each proposal.
    """

    wants_features = True
    kind = "head"
    max_positions = 1 << 30  # the head's cache grows with the committed pairs; the target's context limits

    def __init__(self, head, config: DraftConfig, verify_curve: dict | None = None):
        self.head, self.config = head, sized(config, verify_curve)
        self.cost, self.last_predicted = CostModel(verify_curve), []  # sizes the trees
        self.reset()

    def close(self) -> None:
        self.cache = None

    def reset(self) -> None:
        self.catch_up = (0.0, 0)  # the last catch-up's seconds and pairs
        self.cache = self.head.new_cache()
        self.features = None  # [n, d] target features of committed[0 .. n-1]
        self.n_pairs = 0  # committed pairs in the cache

    def observe(self, feedback: Feedback) -> None:
        _note_step(self, feedback)
        if feedback.features is not None:
            f = feedback.features.to(self.head.lm_head.weight.device)
            self.features = f if self.features is None else torch.cat([self.features, f])

    def _run(self, f, x, positions, mask=None) -> torch.Tensor:
        """The head over (feature, token) pairs appended to its cache -> predicted features [n, d]."""
        dev = self.head.lm_head.weight.device
        return self.head(f[None].to(dev), torch.tensor([x], device=dev),
                         torch.tensor([positions], device=dev), self.cache,
                         None if mask is None else mask[None, None].to(dev))[0]

    @torch.inference_mode()
    def propose(self, committed: list[int], budget: int) -> DraftTree:
        cfg, started = self.config, time.perf_counter()
        n = len(committed) - 1  # pairs available: (f_i, x_{i+1}) for i < n
        if self.features is None or self.features.shape[0] < n:
            raise RuntimeError("the verifier sent no features: the head needs them (features=True in START)")
        self.head.crop_cache(self.cache, self.n_pairs)
        t0 = time.perf_counter()
        fhat = self._run(self.features[self.n_pairs : n], committed[self.n_pairs + 1 : n + 1],
                         list(range(self.n_pairs, n)))
        self.catch_up = (time.perf_counter() - t0, n - self.n_pairs)
        self.n_pairs = n
        if budget <= 0:
            return DraftTree.chain([], kind=self.kind)
        # only the last caught-up pair drafts: the lm_head over the others (a whole prompt at first) is waste
        root_logp = self.head.draft_logprobs(fhat[-1:])[0]
        node_fhat = {0: fhat[-1]}  # pool node -> its predicted feature
        fed: list[int] = []

        def expand(nodes, tokens, parents, depths) -> torch.Tensor:
            mask = tree.expansion_mask(nodes, fed, parents, n)  # [q, kv]
            f_in = torch.stack([node_fhat[parents[node]] for node in nodes])  # [q, d]
            out = self._run(f_in, [tokens[node] for node in nodes], [n + depths[node] - 1 for node in nodes], mask)
            for row, node in enumerate(nodes):
                node_fhat[node] = out[row]
            fed.extend(nodes)
            return self.head.draft_logprobs(out)  # [q, vocab]

        top_k = HEAD_TOP_K if cfg.tree_top_k is None else cfg.tree_top_k
        depth, total = (cfg.tree_depth, cfg.tree_tokens) if top_k > 1 else (cfg.draft_max, cfg.draft_max + 1)
        draft = tree.grow(root_logp, expand, top_k, depth, min(total, budget + 1))
        self.head.crop_cache(self.cache, n)
        draft, self.last_predicted = size_tree(draft, self.cost, cfg, started)
        return replace(draft, kind=self.kind)
