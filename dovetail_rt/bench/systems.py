"""The systems a bench run compares. Each generates greedily (or sampled) from token ids and
reports what it measured; none of them knows about the others.

  target       our verifier decoding one token per step (no draft), same process and dtype as dovetail
  hf           transformers generate(), target only
  hf-assisted  transformers generate(assistant_model=draft), the same draft model object as dovetail
  dovetail-*   our two-process runtime, one row per draft mode
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch


@dataclass
class Run:
    token_ids: list[int]
    seconds: float  # prompt in -> last token out
    ttft_s: float  # prompt in -> first generated token out
    n_drafted: int = 0
    n_accepted: int = 0
    n_steps: int = 0
    timings: dict = field(default_factory=dict)  # draft_s / verify_s / link_s per run

    @property
    def decode_tok_per_s(self) -> float:
        """Tokens after the first one, over the time after the first one (prefill excluded)."""
        n, t = len(self.token_ids) - 1, self.seconds - self.ttft_s
        return n / t if n > 0 and t > 0 else 0.0

    @property
    def tau(self) -> float:
        return (self.n_accepted + self.n_steps) / self.n_steps if self.n_steps else 1.0


class DovetailSystem:
    """A Client on a verifier process; ``draft=None`` is the `target` baseline."""

    def __init__(self, name: str, endpoint: str, draft, tokenizer, draft_config, timeout_s: float = 600):
        from ..client import Client

        self.name = name
        self.client = Client(verifier=endpoint, draft=draft, tokenizer=tokenizer, draft_config=draft_config,
                             timeout_s=timeout_s)

    def generate(self, ids: list[int], n: int, temperature: float, seed: int) -> Run:
        out = self.client.generate(ids, n, temperature=temperature, seed=seed)
        st = out.stats
        return Run(out.token_ids, st.seconds, st.ttft_s, st.n_drafted, st.n_accepted, st.n_steps,
                   {"draft_s": st.timings.draft_s, "verify_s": st.timings.verify_s, "link_s": st.timings.link_s})

    def close(self) -> None:
        self.client.close()


class _FirstTokenClock:
    """A transformers streamer that notes when the first generated token comes out."""

    def __init__(self):
        self.calls, self.first = 0, None

    def put(self, value):
        self.calls += 1
        if self.calls == 2 and self.first is None:  # call 1 is the prompt
            self.first = time.perf_counter()

    def end(self):
        pass


class HFSystem:
    """transformers ``generate``, target alone or with ``assistant_model``."""

    def __init__(self, name: str, target, assistant=None, eos=None):
        self.name, self.target, self.assistant, self.eos = name, target, assistant, eos

    @torch.inference_mode()
    def generate(self, ids: list[int], n: int, temperature: float, seed: int) -> Run:
        torch.manual_seed(seed)
        clock = _FirstTokenClock()
        kwargs = {"do_sample": temperature > 0, "max_new_tokens": n, "streamer": clock, "eos_token_id": self.eos,
                  "pad_token_id": (self.eos or [0])[0] if self.eos else 0}
        if temperature > 0:
            kwargs.update(temperature=temperature, top_k=0, top_p=1.0)
        if self.assistant is not None:
            kwargs["assistant_model"] = self.assistant
        t0 = time.perf_counter()
        out = self.target.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), **kwargs)
        t1 = time.perf_counter()
        return Run(out[0, len(ids):].tolist(), t1 - t0, (clock.first or t1) - t0)

    def close(self) -> None:
        pass
