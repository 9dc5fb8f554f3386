"""Structured output: a grammar limits what the target may generate (llguidance does the parsing).

Why llguidance: no dependencies (xgrammar needs triton and a TVM runtime), it covers what clients
send (JSON Schema, any JSON, Lark, llama.cpp's GBNF, regex), and its mask over the 151,936-token
Qwen vocabulary took 0.04 ms median, 0.1 ms mean per position of a JSON object on a 2-core Zen 5
(bench/NOTES.md, session 13): a small part of a 25-30 ms verification step.

Lossless: the target's logits at every position are masked to what the grammar allows *before*
temperature, top-k and top-p (as vLLM applies its bitmask), and acceptance walks the draft tree
with that masked distribution, so greedy output is exactly the constrained one-token decode and
sampling draws from the constrained distribution (with a seed: the very tokens). A draft is cut at
its first token the grammar forbids before the forward (those nodes could never be accepted). The
log-probabilities a client asks for stay the target's raw ones.

``compile_grammar`` (client, server) turns a request's format and text into llguidance's grammar string,
which crosses the link in START; ``Grammars`` (verifier) holds the target's tokenizer for llguidance,
built once, and makes a ``Constraint`` per generation.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import torch

log = logging.getLogger(__name__)

FORMATS = ("json_schema", "json_object", "lark", "gbnf", "regex")
# Whitespace between JSON tokens, at most this much at a time (a schema's own "x-guidance" wins): with
# llguidance's default (any amount) the 1.5B target, its string at maxLength, ran on in spaces until
# the token limit in 1 of 20 requests (bench/structured.py); indentation 10 levels deep still fits.
JSON_WHITESPACE = r"[\n\r\t ]{0,24}"


class GrammarError(ValueError):
    """A grammar that does not compile, or a target whose tokenizer llguidance cannot use."""


def compile_grammar(format: str, text="") -> str:
    """llguidance's grammar for ``text`` in ``format`` (``json_object``: any JSON object), checked;
    GrammarError says what is wrong."""
    import llguidance

    if format not in FORMATS:
        raise GrammarError(f"unknown grammar format '{format}': one of {', '.join(FORMATS)}")
    if format == "json_object":
        format, text = "json_schema", {"type": "object"}
    if format == "json_schema":
        try:
            schema = json.loads(text) if isinstance(text, str) else text
        except ValueError as exc:
            raise GrammarError(f"the json_schema is not JSON: {exc}") from None
        if isinstance(schema, dict) and "x-guidance" not in schema:
            schema = {**schema, "x-guidance": {"whitespace_pattern": JSON_WHITESPACE}}
        text = json.dumps(schema)
    try:
        grammar = llguidance.grammar_from(format, text)
    except (ValueError, TypeError) as exc:
        raise GrammarError(f"the {format} grammar does not compile: {exc}") from None
    problem = llguidance.LLMatcher.validate_grammar(grammar)
    if problem:
        raise GrammarError(f"the {format} grammar does not compile: {problem}")
    return grammar


class Grammars:
    """The target's tokenizer as llguidance sees it (token bytes, EOS), built on first use (about a
    second for a 150k vocabulary), and a ``Constraint`` per constrained generation.

    The target's transformers tokenizer when it has one (its own byte mapping and special tokens);
    else ``vocab`` (the engine's token strings) is taken as the tokens' text, which is right for
    word-level vocabularies and refused for byte-level ones (their strings are not text). A word-level
    vocabulary has no token for a single byte, so llguidance cannot tokenize the bytes a grammar
    forces: there its Lark grammars run with ``no_forcing``."""

    def __init__(self, vocab: list[str], vocab_size: int, eos: list[int], load_hf_tokenizer=None):
        """``load_hf_tokenizer()``: the target's transformers tokenizer or None, called on first use."""
        self.vocab, self.vocab_size, self.eos, self.load_hf = vocab, vocab_size, list(eos), load_hf_tokenizer
        self._tokenizer, self._words = None, False

    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = self._build()
        return self._tokenizer

    def _build(self):
        import llguidance
        import llguidance.hf

        eos = self.eos or None
        try:
            hf = self.load_hf() if self.load_hf else None
        except Exception as exc:  # transformers raises many kinds for a file it cannot read a tokenizer from
            log.info("no transformers tokenizer for the target (%s): using its token strings", exc)
            hf = None
        if hf is not None and _byte_level(hf):  # its own bytes, and only its special tokens special
            tokens = _byte_level_tokens(hf, self.vocab_size)
            return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_HFEncoder(hf, tokens, eos)), n_vocab=self.vocab_size,
                                          eos_token=eos)
        if hf is not None:
            try:
                return llguidance.hf.from_tokenizer(hf, n_vocab=self.vocab_size, eos_token=eos)
            except ValueError as exc:  # a decoder llguidance does not read (word-level): the strings
                log.info("llguidance cannot read this tokenizer (%s): using its token strings", exc)
        if not any(self.vocab):
            raise GrammarError("structured output needs the target's vocabulary, and this target has no token strings")
        if any(s.startswith(("\u0120", "\u2581")) for s in self.vocab[:5000]):
            raise GrammarError("structured output needs the target's tokenizer files (its token strings are "
                               "byte-level codes, not text): serve an installed model or a folder with its tokenizer")
        tokens = [s.encode("utf-8") for s in self.vocab] + [b""] * (self.vocab_size - len(self.vocab))
        self._words = True
        if not eos:  # llguidance needs an EOS: one past the vocabulary, which no logit row can choose
            tokens, eos = tokens + [b"\xff<|end|>"], [self.vocab_size]
        return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_WordTokenizer(tokens, eos)), n_vocab=len(tokens))

    def constraint(self, grammar: str) -> "Constraint":
        import llguidance

        tokenizer = self.tokenizer()
        if self._words:
            grammar = _no_forcing(grammar)
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"the grammar does not compile: {matcher.get_error()}")
        return Constraint(matcher, self.vocab_size, self.eos)


class Constraint:
    """One generation's grammar state, just after the tokens generated so far."""

    def __init__(self, matcher, vocab_size: int, eos: list[int]):
        self.matcher, self.vocab_size, self.eos = matcher, vocab_size, eos
        self.done = False  # complete, on a target with no EOS to end on: what follows is free

    def allowed(self) -> torch.Tensor:
        """[vocab] bool: the tokens the grammar allows next (EOS alone once it is complete; EOS if it
        allows nothing, so a generation always ends). A target with no EOS cannot end on it: once the
        grammar is complete, every token is allowed (the generation runs to its token limit, as it would
        without a grammar)."""
        if self.done:
            return torch.ones(self.vocab_size, dtype=torch.bool)
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        allowed = torch.from_numpy(np.unpackbits(bits, bitorder="little")[: self.vocab_size].astype(bool))
        if not allowed.any():
            if self.eos:
                allowed[self.eos] = True
            elif self.matcher.is_accepting():
                self.done = True
                return self.allowed()
            else:
                raise GrammarError("nothing this grammar allows next is in the target's vocabulary (and it has no EOS)")
        return allowed

    def masked(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` [vocab] with every token the grammar forbids at -inf."""
        return logits.masked_fill(~self.allowed(), float("-inf"))

    def consume(self, token: int) -> None:
        if self.done:
            return
        if not self.matcher.consume_token(token) and token not in self.eos:
            raise GrammarError(f"token {token} is not allowed here: {self.matcher.get_error()}")

    def cut(self, tokens: list[int], parents: list[int]) -> list[int]:
        """The draft nodes (indices into ``tokens``, the root at 0 included) whose whole path from the
        root the grammar allows; the rest could never be accepted. The state is left as it was."""
        if self.done:
            return list(range(len(tokens)))
        keep, children = [0], [[] for _ in tokens]
        for i, p in enumerate(parents[1:], 1):
            children[p].append(i)
        stack = [(c, [tokens[c]]) for c in reversed(children[0])]
        while stack:
            node, path = stack.pop()
            if self.matcher.validate_tokens(path) < len(path):
                continue  # this token (and all below it) forbidden
            keep.append(node)
            stack += [(c, path + [tokens[c]]) for c in reversed(children[node])]
        return sorted(keep)


def _no_forcing(grammar: str) -> str:
    """llguidance's grammar with forcing off in every Lark part (a word-level vocabulary cannot spell
    the bytes a grammar fixes; see ``Grammars``)."""
    try:
        spec = json.loads(grammar)
    except ValueError:  # plain Lark text
        return '%llguidance {"no_forcing": true}\n' + grammar
    for part in spec.get("grammars", []):
        if part.get("lark_grammar") and "%llguidance" not in part["lark_grammar"]:
            part["lark_grammar"] = '%llguidance {"no_forcing": true}\n' + part["lark_grammar"]
    return json.dumps(spec)


def _byte_level(hf) -> bool:
    try:
        return json.loads(hf.backend_tokenizer.to_str()).get("decoder", {}).get("type") == "ByteLevel"
    except (AttributeError, ValueError):
        return False


def _byte_level_tokens(hf, vocab_size: int) -> list[bytes]:
    """Every token's bytes in a byte-level BPE vocabulary (GPT-2's byte-to-character map undone). An
    added token is its text, marked special (llguidance's 0xff prefix) only where the tokenizer says
    so: Qwen2.5's ``<tool_call>`` is not special, so a grammar's "<tool_call>" can be that one token
    (llguidance's own reader marks every added token special, and its forcing then chose a token its
    grammar refused)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    undo = {c: b for b, c in bytes_to_unicode().items()}
    tokens = [b""] * vocab_size
    for text, i in hf.get_vocab().items():
        if i < vocab_size:
            tokens[i] = bytes(undo[c] for c in text) if all(c in undo for c in text) else text.encode("utf-8")
    for i, added in hf.added_tokens_decoder.items():
        if i < vocab_size:
            tokens[i] = (b"\xff" if added.special else b"") + added.content.encode("utf-8")
    return tokens


class _HFEncoder:
    """What llguidance's TokenizerWrapper reads, for a transformers tokenizer with given token bytes."""

    def __init__(self, hf, tokens: list[bytes], eos: list[int] | None):
        self.hf, self.tokens = hf, tokens
        self.eos_token_id = hf.eos_token_id if hf.eos_token_id in (eos or [hf.eos_token_id]) else eos[0]
        self.bos_token_id = hf.bos_token_id
        self.special_token_ids = sorted(i for i, t in hf.added_tokens_decoder.items() if t.special and i < len(tokens))

    def __call__(self, text: bytes) -> list[int]:
        return self.hf.encode(text.decode("utf-8", errors="replace"), add_special_tokens=False)


class _WordTokenizer:
    """What llguidance's TokenizerWrapper reads: token bytes, EOS, and an encoder (longest match)."""

    def __init__(self, tokens: list[bytes], eos: list[int] | None):
        self.tokens, self.eos_token_id, self.bos_token_id = tokens, (eos or [0])[0], None
        self.special_token_ids = list(eos or [])
        self._by_bytes = {t: i for i, t in enumerate(tokens) if t}
        self._longest = max((len(t) for t in tokens), default=1)

    def __call__(self, text: bytes) -> list[int]:
        ids, i = [], 0
        while i < len(text):
            for n in range(min(self._longest, len(text) - i), 0, -1):
                if text[i : i + n] in self._by_bytes:
                    ids.append(self._by_bytes[text[i : i + n]])
                    i += n
                    break
            else:
                i += 1  # a byte no token spells: skipped
        return ids
