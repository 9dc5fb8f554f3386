"""Run lengths of lookup drafts (-md ngram) per match length, the data behind ``ngram.PRIOR_RATES``.

Every lookup proposal is sent whole (chains of up to 16 tokens, no cost model) to a llama.cpp verifier
of the installed target; per bucket of match lengths it prints (steps, hits / (hits + misses)), where
hits are accepted draft tokens and a miss is a step whose draft was not accepted to its end: the
per-token rate of a geometric run length. Cumulative over the specs, one line after each:

    python bench/lookup_rates.py humaneval-edit:100:106:200 mtbench:60:66:128   # DATASET:FIRST:LAST:N_NEW
"""

from __future__ import annotations

import sys
from collections import defaultdict

from dovetail_rt import data, ngram, store
from dovetail_rt.client import Client, encode_prompt
from dovetail_rt.config import CHILD_ENDPOINT, DraftConfig, LinkConfig, VerifierConfig, dovetail_home
from dovetail_rt.launcher import VerifierChild


class Measured(ngram.NgramDrafter):
    """The lookup drafter, counting hits and misses per match-length bucket of what it sent."""

    def __init__(self, *args):
        super().__init__(*args)
        self.sent: tuple[int, int] | None = None
        self.steps, self.hits, self.misses = defaultdict(int), defaultdict(int), defaultdict(int)

    def propose(self, committed, budget):
        draft = super().propose(committed, budget)
        self.sent = self.last if len(draft) else None  # (bucket, depth sent): chains, so depth = length
        return draft

    def observe(self, feedback):
        if self.sent:
            b, k = self.sent
            self.steps[b] += 1
            self.hits[b] += feedback.n_accepted
            self.misses[b] += feedback.n_accepted < k
        super().observe(feedback)


def main(specs: list[str]) -> None:
    home = dovetail_home()
    tokenizer = store.load_tokenizer(store.DEFAULT_TARGET, home)
    config = DraftConfig(draft_max=16, tree_top_k=1, adaptive=False)
    target = VerifierConfig(model=store.DEFAULT_TARGET, home=home, engine="llamacpp", link=LinkConfig(endpoint=CHILD_ENDPOINT))
    with VerifierChild(target) as child:
        with Client(verifier=child.endpoint, draft=ngram.Lookup(), tokenizer=tokenizer, draft_config=config) as client:
            client.drafter = drafter = Measured(ngram.Lookup(), config)
            for spec in specs:
                name, first, last, n_new = spec.split(":")
                for p in data.load(name)[int(first):int(last)]:
                    client.generate(encode_prompt(tokenizer, p.text, p.chat), int(n_new))
                rates = {b: (drafter.steps[b], round(drafter.hits[b] / (drafter.hits[b] + drafter.misses[b]), 3))
                         for b in sorted(drafter.steps)}
                print(spec, rates, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["humaneval-edit:100:106:200", "mtbench:60:66:128"])
