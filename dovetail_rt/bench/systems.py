"""The systems a bench run compares. Each generates greedily (or sampled) from token ids and
reports what it measured; none of them knows about the others.

  target       our verifier decoding one token per step (no draft), on the same engine and file as dovetail
  hf           transformers generate(), target only (torch, --dtype)
  hf-assisted  transformers generate(assistant_model=draft), a torch copy of the draft (int8 on the CPU)
  dovetail-*   our two-process runtime, one row per draft mode (and per engine: ROW@ENGINE after the first)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..sampling import SamplingParams


@dataclass
class Run:
    token_ids: list[int]
    seconds: float  # prompt in -> last token out
    ttft_s: float  # prompt in -> first generated token out
    n_drafted: int = 0
    n_accepted: int = 0
    n_steps: int = 0
    timings: dict = field(default_factory=dict)  # draft_s / verify_s / link_s per run
    by_kind: dict = field(default_factory=dict)  # draft kind -> {steps, drafted, accepted, draft_s}

    @property
    def decode_tok_per_s(self) -> float:
        """Tokens after the first one, over the time after the first one (prefill excluded)."""
        n, t = len(self.token_ids) - 1, self.seconds - self.ttft_s
        return n / t if n > 0 and t > 0 else 0.0


class DovetailSystem:
    """A Client on a verifier process; ``draft=None`` is the `target` baseline."""

    def __init__(self, name: str, endpoint: str, draft, tokenizer, draft_config, timeout_s: float = 600):
        from ..client import Client

        self.name = name
        self.client = Client(verifier=endpoint, draft=draft, tokenizer=tokenizer, draft_config=draft_config,
                             timeout_s=timeout_s)

    def generate(self, ids: list[int], n: int, temperature: float, seed: int) -> Run:
        out = self.client.generate(ids, n, SamplingParams(temperature), seed=seed)
        self.client.new_session()  # untimed: its cells leave the shared pool, as if this row ran alone
        st = out.stats
        return Run(out.token_ids, st.seconds, st.ttft_s, st.n_drafted, st.n_accepted, st.n_steps,
                   {"draft_s": st.timings.draft_s, "verify_s": st.timings.verify_s, "link_s": st.timings.link_s},
                   {kind: vars(k).copy() for kind, k in st.by_kind.items()})

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
                  "pad_token_id": self.eos[0] if self.eos else 0}
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


class LlamaCppSystem:
    """llama.cpp on the same GGUF weights (a baseline, found in $DOVETAIL_HOME/llama.cpp).

    `llamacpp` runs llama-completion (target alone), `llamacpp-spec` llama-speculative-simple
    with the same draft GGUF, `llamacpp-ngram:TYPE` llama-speculative-simple with no draft model and
    ``--spec-type TYPE`` (its n-gram lookups: ngram-simple, ngram-map-k, ngram-mod, ngram-cache). Timings are llama.cpp's own (model load excluded). Its output is
    text: token ids come from re-tokenizing it, so the identical-output rate is text-based.
    """

    def __init__(self, name: str, bin_dir, target_gguf, draft_gguf, tokenizer, threads: int, draft_max: int = 3,
                 spec_type: str | None = None):
        self.name, self.bin_dir, self.tokenizer, self.spec_type = name, bin_dir, tokenizer, spec_type
        self.target_gguf, self.draft_gguf, self.threads, self.draft_max = target_gguf, draft_gguf, threads, draft_max

    def generate(self, ids: list[int], n: int, temperature: float, seed: int) -> Run:
        import os
        import re
        import subprocess
        import tempfile

        text = self.tokenizer.decode(ids)
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
            f.write(text)
        # -bf, not -f: llama.cpp's -f drops the prompt's last newline (every HumanEval prompt ends with one),
        # and --no-escape keeps a prompt's backslashes as they are
        common = ["-m", str(self.target_gguf), "-bf", f.name, "--no-escape", "-n", str(n), "-t", str(self.threads),
                  "--temp", str(temperature), "--seed", str(seed), "-c", "4096"]
        if self.name == "llamacpp":
            cmd = [str(self.bin_dir / "llama-completion"), *common, "-no-cnv", "--no-display-prompt", "--no-warmup"]
        elif self.spec_type:  # llama.cpp's n-gram lookup, with its defaults for that type
            cmd = [str(self.bin_dir / "llama-speculative-simple"), *common, "--spec-type", self.spec_type]
        else:
            cmd = [str(self.bin_dir / "llama-speculative-simple"), *common, "-md", str(self.draft_gguf),
                   "--spec-type", "draft-simple", "--spec-draft-n-max", str(self.draft_max)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=1800)
        finally:
            os.unlink(f.name)
        if proc.returncode != 0:
            raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}): {proc.stderr[-1500:]}")
        log = proc.stderr
        if self.name == "llamacpp":
            p_ms, _ = _grab(r"prompt eval time =\s*([\d.]+) ms /\s*(\d+) tokens", log)
            e_ms, runs = _grab(r"\beval time =\s*([\d.]+) ms /\s*(\d+) runs", log)
            out_text = re.sub(r" ?\[end of text\]\n?$", "", proc.stdout)
            first = p_ms / 1000 + (e_ms / 1000 / runs if runs else 0.0)
            toks = self.tokenizer(out_text, add_special_tokens=False)["input_ids"][:n]
            # seconds chosen so that decode tok/s equals llama.cpp's own eval rate
            return Run(toks, first + (len(toks) - 1) * (e_ms / 1000 / max(runs, 1)), first)
        enc_s = float(re.search(r"encoded\s+\d+ tokens in\s+([\d.]+) seconds", log).group(1))
        n_dec, dec_s = re.search(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds", log).groups()
        drafted = int(re.search(r"n_drafted = (\d+)", log).group(1))
        accepted = int(re.search(r"n_accept\s+= (\d+)", log).group(1))
        out_text = proc.stdout.split(text, 1)[-1] if text in proc.stdout else proc.stdout
        out_text = out_text[:-2] if out_text.endswith("\n\n") else out_text  # its closing blank line
        toks = self.tokenizer(out_text, add_special_tokens=False)["input_ids"][:n]
        return Run(toks, enc_s + float(dec_s), enc_s, n_drafted=drafted, n_accepted=accepted)

    def close(self) -> None:
        pass


def _grab(pattern: str, text: str) -> tuple[float, int]:
    import re

    m = re.search(pattern, text)
    if not m:
        raise RuntimeError(f"llama.cpp printed no '{pattern}' line")
    return float(m.group(1)), int(m.group(2))
