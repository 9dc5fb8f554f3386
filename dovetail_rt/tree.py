"""Dynamic draft trees (EAGLE-2): grow by cumulative log-probability, keep the best nodes.

Model-agnostic: the caller supplies ``expand(nodes, tokens, parents, depths)`` that runs the draft
on the pool nodes ``nodes`` and returns their children's log-probs [len(nodes), vocab]. Node 0 is the root (the last committed token); returned trees use the wire layout:
draft nodes 1..n with ``parents[i-1]`` in 0..i-1, parents before children, siblings best first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DraftTree:
    tokens: list[int]  # draft nodes 1..n
    parents: list[int]  # parent of node i at [i - 1]; 0 = the root
    scores: list[float]  # cumulative draft log-probability of each node
    kind: str = ""  # the draft kind that made it ("lm", "head", "ngram"): the stats count per kind

    def __len__(self) -> int:
        return len(self.tokens)

    @staticmethod
    def chain(tokens: list[int], scores: list[float] | None = None, kind: str = "") -> "DraftTree":
        return DraftTree(list(tokens), list(range(len(tokens))), scores or [0.0] * len(tokens), kind)


def pool_depths(parents: list[int]) -> list[int]:
    """Depth of each node of a pool or forest whose roots have parent -1 (a root has depth 0);
    parents come before their children. Positions are the committed length + depth."""
    out: list[int] = []
    for p in parents:
        out.append(0 if p < 0 else out[p] + 1)
    return out


def depths(parents: list[int]) -> list[int]:
    """Depth of draft nodes 1..n in wire layout (``parents[i - 1]`` of node i, 0 = the root): 1 = a root child."""
    return [d + 1 for d in pool_depths([p - 1 for p in parents])]


def walk(t: DraftTree, tokens) -> int:
    """The node reached from the root along ``tokens`` (an accepted path; 0 = the root), or -1 where the
    tree has no such path."""
    node = 0
    for tok in tokens:
        node = next((i + 1 for i in range(node, len(t)) if t.parents[i] == node and t.tokens[i] == tok), -1)
        if node < 0:
            return -1
    return node


def is_leaf(t: DraftTree, node: int) -> bool:
    """No draft node hangs from ``node`` (node ids as ``walk`` gives them; parents come before children)."""
    return node not in t.parents[node:]


def prune(t: DraftTree, n: int, rank: list[float] | None = None) -> DraftTree:
    """The ``n`` best nodes of a tree by ``rank`` (default: score), still a tree in wire layout (a
    child never outranks its parent and ties keep the older node, so kept nodes keep their ancestors)."""
    if n >= len(t):
        return t
    rank = t.scores if rank is None else rank
    keep = sorted(sorted(range(len(t)), key=lambda i: (-rank[i], i))[:n])
    new_id = {0: 0, **{old + 1: j + 1 for j, old in enumerate(keep)}}
    return DraftTree([t.tokens[i] for i in keep], [new_id[t.parents[i]] for i in keep], [t.scores[i] for i in keep], t.kind)


def expansion_mask(nodes: list[int], fed: list[int], parents: list[int], past_len: int) -> torch.Tensor:
    """[q, past_len + len(fed) + q] bool mask for running pool ``nodes`` after the cache: each sees the
    ``past_len`` cached tokens, its ancestors among the already-run nodes (``fed``, in cache order)
    and among ``nodes``, and itself. A node's parents come before it; -1 (or any id run neither
    before nor now) is the cached prefix."""
    mask = torch.zeros(len(nodes), past_len + len(fed) + len(nodes), dtype=torch.bool)
    mask[:, :past_len] = True
    slot = {m: past_len + i for i, m in enumerate(list(fed) + list(nodes))}
    for row, n in enumerate(nodes):
        mask[row, slot[n]] = True
        p = parents[n]
        while p >= 0:
            if p in slot:
                mask[row, slot[p]] = True
            p = parents[p]
    return mask


def grow(root_logprobs: torch.Tensor, expand, top_k: int, depth: int, total_tokens: int) -> DraftTree:
    """EAGLE-2 dynamic tree: for ``depth`` rounds expand the top-k children of the top-k frontier
    nodes (by cumulative log-prob), then keep the best ``total_tokens - 1`` nodes.

    root_logprobs: [vocab] draft log-probs after the root. ``expand`` gets node ids into the
    growing pool (0 is the root) and the pool's tokens, parents and depths so far.
    """
    tokens, parents, scores, depths = [0], [-1], [0.0], [0]  # the pool; index 0 = root
    logp, frontier = root_logprobs[None], [0]  # [n_frontier, vocab]
    for d in range(depth):
        top = torch.topk(logp, top_k, dim=-1)  # [n_frontier, k]
        new = []
        for row, node in enumerate(frontier):
            for lp, tok in zip(top.values[row].tolist(), top.indices[row].tolist()):
                tokens.append(tok), parents.append(node), scores.append(scores[node] + lp), depths.append(d + 1)
                new.append(len(tokens) - 1)
        if d == depth - 1:
            break
        frontier = sorted(new, key=lambda n: -scores[n])[:top_k]
        logp = expand(frontier, tokens, parents, depths)
    # A child never outscores its parent (log-probs <= 0) and ties go to the older node, so the
    # best nodes always include their ancestors.
    keep = sorted(sorted(range(1, len(tokens)), key=lambda n: (-scores[n], n))[: total_tokens - 1])
    new_id = {0: 0, **{old: i + 1 for i, old in enumerate(keep)}}
    return DraftTree([tokens[n] for n in keep], [new_id[parents[n]] for n in keep], [scores[n] for n in keep])
