"""Pure tensor math shared by both sides: processed distributions and lossless acceptance.

Terms (one verification step):
  root        the last committed token; the target has not run it yet.
  draft tree  nodes 1..k, each a token with a parent (0 = the root); parents precede children,
              and the children of a node are listed in the order the draft prefers them.
  p           the target's processed distribution (temperature, top-k, top-p applied) at a node.
  accepted    draft tokens kept: a path from the root down the tree.
  bonus       one token the target adds itself at the end of the accepted path: its own choice
              where no child was accepted (the correction) or below a leaf (the bonus proper).
The output is the target's: greedy gives its argmax tokens, sampling its exact distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def processed_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Target probabilities after temperature, then top-k, then top-p (the order HF applies them).

    logits: [..., vocab] -> probs [..., vocab] float32. Greedy gives a one-hot argmax.
    """
    logits = logits.float()
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]  # [..., 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)  # ascending: drop the low tail of mass 1 - top_p
        drop_sorted = cum <= 1 - params.top_p
        drop_sorted[..., -1] = False  # always keep the most likely token
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(-1)


def children_lists(parents: list[int]) -> list[list[int]]:
    """parents[i] for nodes 0..q-1 (parents[0] = -1, the root) -> children of each node, in order."""
    children = [[] for _ in parents]
    for node, parent in enumerate(parents[1:], start=1):
        children[parent].append(node)
    return children


def accept_greedy(tokens: list[int], parents: list[int], target_argmax: list[int]) -> tuple[list[int], int]:
    """Longest path whose every token is the target's argmax at its parent.

    tokens/parents: the tree incl. the root at 0; target_argmax[i]: the target's choice after node i.
    Returns (accepted node indices, bonus token).
    """
    return accept_walk(tokens, parents, lambda node, depth: target_argmax[node])


def accept_walk(tokens: list[int], parents: list[int], choose) -> tuple[list[int], int]:
    """The walk every acceptance is: from the root, ``choose(node, depth)`` gives the target's own
    token after ``node`` (``depth``: accepted tokens so far); the child with that token is accepted
    and the walk goes on below it; where none has it, that token is the bonus. ``choose`` is called
    exactly once per generated token, in order (a grammar's state can follow it)."""
    children = children_lists(parents)
    node, path = 0, []
    while True:
        x = choose(node, len(path))
        match = next((c for c in children[node] if tokens[c] == x), None)
        if match is None:
            return path, x
        path.append(match)
        node = match


def uniform(seed: int, position: int) -> float:
    """The uniform number in [0, 1) that decides the token at sequence index ``position`` of a
    generation seeded with ``seed``: counter-based (numpy's Philox, keyed by the seed, the index as its
    counter), so a token's draw depends on the seed and its index only: not on the draft, on the
    lookup index, or on what ran before or beside it."""
    return float(np.random.Generator(np.random.Philox(key=seed % (1 << 64), counter=position)).random())


def inverse_cdf(p: torch.Tensor, u: float) -> int:
    """The token whose CDF interval holds ``u``: a sample of ``p`` ([vocab]) for a uniform ``u``;
    tokens of probability 0 are never chosen."""
    cdf = p.double().cumsum(0)
    return min(int(torch.searchsorted(cdf, u * cdf[-1].item(), right=True)), p.shape[0] - 1)


def accept_sampling(tokens: list[int], parents: list[int], p: torch.Tensor, seed: int, position: int) -> tuple[list[int], int]:
    """Lossless acceptance of a deterministic draft tree under sampling, reproducible by seed.

    At a node of depth d the target draws its own token x ~ p by inverse CDF with
    ``uniform(seed, position + d)``; the child whose token is x is accepted and the walk goes on
    below it; where no child is x, x is the correction (or, below a leaf, the bonus). Each accepted
    token is exactly the target's own draw, so the output is the target's distribution and, for a
    seed, the very tokens the target alone gives with that seed (``position``: the sequence index of
    the token after the root). A child is accepted with probability p(x) given the path so far, as
    in speculative sampling with a deterministic draft. p: [q, vocab] processed probabilities."""
    return accept_walk(tokens, parents, lambda node, depth: inverse_cdf(p[node], uniform(seed, position + depth)))


MAX_TOP_LOGPROBS = 20  # OpenAI's limit for top_logprobs


def logprobs(logits: torch.Tensor, tokens: list[int], top: int) -> dict[str, torch.Tensor]:
    """The target's own log-probabilities of ``tokens`` (row i of ``logits`` [n, vocab] chose token
    i) and its ``top`` most likely tokens per row: the raw distribution, before temperature, top-k
    and top-p (vLLM's default, ``raw_logprobs``), whatever the draft did. -> tensors for RESULT:
    ``logprobs`` [n] float32 and, when ``top`` > 0, ``top_ids`` [n, top] int32 and ``top_logprobs``."""
    lp = torch.log_softmax(logits.float(), -1)
    out = {"logprobs": lp.gather(-1, torch.tensor(tokens)[:, None])[:, 0].contiguous()}
    if top > 0:
        values, ids = lp.topk(top, -1)
        out.update(top_ids=ids.to(torch.int32).contiguous(), top_logprobs=values.contiguous())
    return out


def validate_tree(parents: list[int], n_nodes: int) -> str | None:
    """None if parents describe a tree over nodes 1..n (parent index < node index), else why not."""
    if len(parents) != n_nodes:
        return f"{n_nodes} tokens but {len(parents)} parents"
    for node, parent in enumerate(parents, start=1):
        if not 0 <= parent < node:
            return f"node {node} has parent {parent}: parents must precede children (0 = root)"
    return None
