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
    children = children_lists(parents)
    node, path = 0, []
    while True:
        match = next((c for c in children[node] if tokens[c] == target_argmax[node]), None)
        if match is None:
            return path, target_argmax[node]
        path.append(match)
        node = match


def accept_sampling(
    tokens: list[int], parents: list[int], p: torch.Tensor, generator: torch.Generator
) -> tuple[list[int], int]:
    """Lossless acceptance of a deterministic draft tree under sampling.

    At a node, try its children in order: accept child x with probability p(x); on rejection set
    p(x) = 0 and renormalise; if every child fails, sample the correction from what is left.
    Below the last accepted node, sample the bonus from p. p: [q, vocab] processed probabilities.
    """
    children = children_lists(parents)
    node, path = 0, []
    while True:
        residual = p[node].clone()  # [vocab]
        for child in children[node]:
            x = tokens[child]
            if torch.rand((), generator=generator).item() < residual[x].item():
                path.append(child)
                node = child
                break
            residual[x] = 0.0
            residual /= residual.sum()
        else:
            return path, int(torch.multinomial(residual, 1, generator=generator).item())


def validate_tree(parents: list[int], n_nodes: int) -> str | None:
    """None if parents describe a tree over nodes 1..n (parent index < node index), else why not."""
    if len(parents) != n_nodes:
        return f"{n_nodes} tokens but {len(parents)} parents"
    for node, parent in enumerate(parents, start=1):
        if not 0 <= parent < node:
            return f"node {node} has parent {parent}: parents must precede children (0 = root)"
    return None
