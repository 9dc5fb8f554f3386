"""The draft side's proposers. A drafter turns the committed tokens into a draft tree.

Every draft kind implements the same two calls, so the loop in ``client.py`` never changes:

    propose(committed, budget) -> DraftTree   (at most ``budget`` draft nodes)
    observe(features)                         (target features of the newly committed tokens;
                                               kinds that set wants_features = False ignore them)
    reset()                                   (a new generation starts)
"""

from __future__ import annotations

import math

import torch
from transformers import DynamicCache

from . import models, tree
from .config import DraftConfig
from .tree import DraftTree


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class DraftLM:
    """A standalone small LM that shares the target's tokenizer (e.g. Qwen2.5-Coder-0.5B).

    Its KV cache holds a prefix of the committed tokens; each round it runs the tokens the
    cache lacks, then drafts greedily (deterministic drafts: no probabilities cross the wire).
    """

    wants_features = False

    def __init__(self, model, config: DraftConfig):
        self.model, self.config = model, config
        self.reset()

    def reset(self) -> None:
        self.cache = DynamicCache(config=self.model.config)
        self.cached: list[int] = []  # tokens whose keys/values are in the cache

    def observe(self, features) -> None:
        pass

    @torch.inference_mode()
    def propose(self, committed: list[int], budget: int) -> DraftTree:
        logits = self._catch_up(committed)  # [vocab] after the last committed token
        if budget <= 0:
            return DraftTree.chain([])
        if self.config.is_tree:
            return self._tree(committed, logits, budget)
        return self._chain(logits, budget)

    def _catch_up(self, committed: list[int]) -> torch.Tensor:
        keep = min(common_prefix(self.cached, committed), len(committed) - 1)  # rerun >= 1 token
        models.crop_cache(self.cache, keep)
        new = committed[keep:]
        logits, _ = models.forward(self.model, self.cache, new, list(range(keep, len(committed))))
        self.cached = list(committed)
        return logits[-1]

    def _chain(self, logits: torch.Tensor, budget: int) -> DraftTree:
        """Greedy chain; stop early when the draft's confidence falls under p_min."""
        cfg = self.config
        tokens, scores = [], []
        while len(tokens) < min(budget, cfg.draft_max):
            logp = logits.float().log_softmax(-1)
            lp, tok = (t.item() for t in logp.max(-1))
            if len(tokens) >= cfg.draft_min and lp < _log(cfg.p_min):
                break
            tokens.append(tok)
            scores.append((scores[-1] if scores else 0.0) + lp)
            if len(tokens) < min(budget, cfg.draft_max):
                logits, _ = models.forward(self.model, self.cache, [tok], [len(self.cached)])
                self.cached.append(tok)
        return DraftTree.chain(tokens, scores)

    def _tree(self, committed: list[int], logits: torch.Tensor, budget: int) -> DraftTree:
        """EAGLE-2 dynamic tree; each expansion is one draft forward with a tree mask."""
        cfg = self.config
        base = len(committed)  # cache length; the root sits at position base - 1
        fed: list[int] = []  # pool ids whose keys/values follow the committed tokens in the cache

        def expand(nodes, tokens, parents, depths) -> torch.Tensor:
            mask = torch.zeros(len(nodes), base + len(fed) + len(nodes), dtype=torch.bool)  # [q, kv]
            mask[:, :base] = True
            for row, n in enumerate(nodes):
                ancestors = _ancestors(n, parents)
                for slot, m in enumerate(fed):
                    mask[row, base + slot] = m in ancestors
                mask[row, base + len(fed) + row] = True
            positions = [base - 1 + depths[n] for n in nodes]
            out, _ = models.forward(self.model, self.cache, [tokens[n] for n in nodes], positions, mask[None, None])
            fed.extend(nodes)
            return out.float().log_softmax(-1)  # [len(nodes), vocab]

        draft = tree.grow(logits.float().log_softmax(-1), expand, cfg.tree_top_k, cfg.tree_depth,
                          min(cfg.tree_tokens, budget + 1))
        models.crop_cache(self.cache, base)
        return draft


def _ancestors(n: int, parents: list[int]) -> set[int]:
    out = set()
    while parents[n] >= 0:
        n = parents[n]
        out.add(n)
    return out


def _log(p: float) -> float:
    return float("-inf") if p <= 0 else math.log(p)
