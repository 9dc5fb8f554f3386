"""Run lengths of lookup drafts (-md ngram) per match length, the data behind ``ngram.PRIOR_RATES``.

Every lookup proposal is sent whole (chains of up to 16 tokens, no cost model) to a llama.cpp verifier
of the installed target; per bucket of match lengths it prints (steps, first, rate) as ``RunLength``
learns them: ``first`` the share of steps whose first draft token was accepted, ``rate`` the chance of
each next token given the one before (hits: accepted tokens after the first; a miss: a step that had
its first token accepted but stopped before the draft's end). Cumulative over the specs, one line after each:

    python bench/lookup_rates.py humaneval-edit:100:110:200 humaneval-review:100:110:200 mtbench:60:70:128
    # DATASET:FIRST:LAST:N_NEW
"""

from __future__ import annotations

import sys
from collections import defaultdict

from dovetail_rt import data, ngram, store
from dovetail_rt.client import Client, encode_prompt
from dovetail_rt.config import CHILD_ENDPOINT, DraftConfig, LinkConfig, VerifierConfig, dovetail_home
from dovetail_rt.launcher import VerifierChild


class Measured(ngram.NgramDrafter):
    """The lookup drafter, counting per match-length bucket of what it sent: steps, first-token hits,
    and the run's hits and misses after the first token."""

    def __init__(self, *args):
        super().__init__(*args)
        self.count = defaultdict(lambda: [0, 0, 0, 0])  # bucket -> [steps, first hits, hits, misses]

    def observe(self, feedback):
        if self.last is not None and len(self.last[1]):
            b, sent = self.last
            c, a = self.count[b], feedback.n_accepted
            c[0] += 1
            c[1] += a > 0
            c[2] += max(a - 1, 0)
            c[3] += 0 < a < len(sent)  # chains: whole = accepted to the end
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
                    client.generate(encode_prompt(tokenizer, p.text, p.chat, p.messages[:-1]), int(n_new))
                rates = {b: (n, round(first / n, 3), round(hits / max(hits + misses, 1), 3))
                         for b, (n, first, hits, misses) in sorted(drafter.count.items())}
                print(spec, rates, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["humaneval-edit:100:110:200", "humaneval-review:100:110:200", "mtbench:60:70:128"])
