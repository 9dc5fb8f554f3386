"""Single-process reference of the whole method, written for clarity, not speed.

No sockets, no target KV cache kept between steps: every step runs the target over the full
prefix plus the draft tree in a fresh session. Works on any engine behind the ``lm`` seam; the
two-process fast path (client + verifier) is tested against this.
"""

from __future__ import annotations

import torch

from . import lm, sampling
from .client import Generation, GenerationStats
from .config import DraftConfig
from .draft_kinds import make_drafter
from .drafter import Drafter


def speculative_generate(
    target: lm.LM, draft, prompt: list[int], max_new_tokens: int, draft_config: DraftConfig,
    params: sampling.SamplingParams = sampling.SamplingParams(), seed: int = 0,
) -> Generation:
    """``draft``: a small LM (``lm.LM``) or any ``Drafter``."""
    drafter = draft if isinstance(draft, Drafter) else make_drafter(draft, draft_config)
    drafter.reset()
    stats = GenerationStats(n_prompt=len(prompt))

    def target_choice(tokens, parents, logits, position):
        if params.greedy:
            return sampling.accept_greedy(tokens, parents, logits.argmax(-1).tolist())
        return sampling.accept_sampling(tokens, parents, sampling.processed_probs(logits, params), seed, position)

    def target_logits(prefix, tokens, parents):
        """A fresh state: the prefix, then the tree below it; logits of every tree node."""
        state = target.session()
        try:
            if prefix:
                state.forward(prefix, logits_for=0)
                state.keep(list(range(len(prefix))))
            return state.forward(tokens, parents).logits
        finally:
            state.close()

    logits = target_logits(prompt[:-1], prompt[-1:], [-1])
    _, first = target_choice([0], [-1], logits, len(prompt))
    committed, out = list(prompt) + [first], [first]
    while len(out) < max_new_tokens:
        draft_tree = drafter.propose(committed, budget=max_new_tokens - len(out) - 1)
        # the whole sequence again: the committed prefix, then root + draft tree below it
        tree_tokens = [committed[-1]] + draft_tree.tokens
        tree_parents = [-1] + draft_tree.parents
        logits = target_logits(committed[:-1], tree_tokens, tree_parents)
        path, bonus = target_choice(tree_tokens, tree_parents, logits, len(committed))
        new = [tree_tokens[i] for i in path] + [bonus]
        stats.n_steps += 1
        stats.n_drafted += len(draft_tree)
        stats.n_accepted += len(path)
        take = new[: max_new_tokens - len(out)]
        out += take
        committed += take
    stats.n_generated = len(out)
    stats.tau = (stats.n_accepted + stats.n_steps) / max(stats.n_steps, 1)
    return Generation(out, stats)
