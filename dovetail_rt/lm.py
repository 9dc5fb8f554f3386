"""The model seam: every part of dovetail_rt that runs a language model goes through this interface.

An engine module (``lm_torch`` for transformers, ``lm_llamacpp`` for llama.cpp) opens a model once
per process (:func:`open_lm`) and hands out per-generation :class:`Session` objects that own a KV
cache. A session holds *committed* tokens (``length`` of them) and, after a forward, *pending*
nodes: a forest of tokens hanging below the committed ones, each at position
``length + depth``. A forward appends pending nodes; ``keep`` commits one root-to-node path of them
and drops the rest; ``truncate`` drops pending nodes and committed tokens past a length.

    lm = open_lm("qwen2.5-coder-1.5b", home, engine="auto")
    s = lm.session()
    out = s.forward(prompt, logits_for=1)            # a chain, [1, vocab] logits of its last token
    s.keep(list(range(len(prompt))))                 # commit it
    out = s.forward([root, a, b, c], [-1, 0, 0, 1])  # a tree: b and a are siblings, c is a's child
    s.keep([0, 1, 3])                                # commit root, a, c

Pending indices count every pending node since the last ``keep`` / ``truncate`` in the order they
were forwarded, so a draft can grow a tree over several forwards (a parent index may point at an
earlier forward's node). No engine module is imported here until it is asked for.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from . import store

ENGINES = {"torch": "dovetail_rt.lm_torch", "llamacpp": "dovetail_rt.lm_llamacpp"}


@dataclass(frozen=True)
class ModelInfo:
    """What a handshake and a start-up line need to know about an opened model."""

    name: str  # the spec the user gave
    engine: str  # "torch" or "llamacpp"
    path: str  # the file or folder loaded
    weight_format: str  # "float32", "bfloat16", "int8", "Q4_K_M", "Q4_0", ...
    vocab: list[str] = field(repr=False)  # token strings in id order (the handshake compares them)
    vocab_size: int  # logits width
    hidden_size: int  # width of the features
    eos: list[int]  # end-of-generation ids
    max_positions: int  # the longest sequence one session may hold
    trees: bool = True  # one forward over a tree of pending nodes
    features: bool = True  # last-layer hidden states (what a draft head reads)
    batches: bool = False  # ``forward_batch`` runs several sessions in one pass (the verifier then batches them)
    kernels: str = ""  # which CPU kernels run it and why (llama.cpp: the probe's verdict, ``kernels.py``)

    def describe(self) -> str:
        return f"{self.engine} engine, {self.weight_format} weights, {self.path}"


@dataclass
class Output:
    logits: torch.Tensor  # [rows, vocab] float32: the last ``logits_for`` nodes of the forward
    features: torch.Tensor | None = None  # [q, hidden] post-norm last-layer states, when asked for


class Session(Protocol):
    length: int  # committed tokens

    def forward(self, tokens: list[int], parents: list[int] | None = None, logits_for: int | None = None) -> Output:
        """Run ``tokens`` as new pending nodes. ``parents[i]``: -1 = hangs below the committed tokens,
        else a pending index (earlier nodes, or this call's nodes 0..i-1 numbered after them).
        ``None`` = a chain that continues the last pending node (or the committed tokens)."""

    def keep(self, path: list[int]) -> None:
        """Commit the pending nodes ``path`` (a root-to-node chain of pending indices); drop the others."""

    def truncate(self, length: int) -> None:
        """Drop every pending node and every committed token past ``length``."""

    def close(self) -> None: ...


class LM(Protocol):
    info: ModelInfo

    def session(self, features: bool = False) -> Session:
        """A fresh state; ``features`` asks the forwards to return last-layer hidden states."""

    def forward_batch(self, items: list[tuple[Session, list[int], list[int] | None, int | None]]
                      ) -> list[Output | Exception | None]:
        """Several sessions' forwards ``(session, tokens, parents, logits_for)``, one per session, in as
        few passes as the engine can. Per item: its ``Output``, the exception that refused it (that
        session is as it was), or None: not run for want of room, ask again after the others' ``keep``.
        Each session's output is what its own ``forward`` gives, up to the engine's batch-size numerics."""

    def close(self) -> None: ...


class EngineMissing(RuntimeError):
    pass


class CacheFull(MemoryError):
    """The engine's KV budget (cells, sequence ids) has no room for this forward now."""


def choose_engine(engine: str, spec: str, home: Path, device: str = "cpu") -> str:
    """``auto``: llama.cpp for a .gguf file and for an installed default whose GGUF is kept, on the CPU;
    transformers for model folders, hub ids and CUDA."""
    if engine not in ("auto", *ENGINES):
        raise ValueError(f"unknown engine '{engine}'; choose auto, {', '.join(ENGINES)}")
    if engine != "auto":
        return engine
    if device != "cpu":
        return "torch"
    return "llamacpp" if store.gguf_file(spec, home) is not None and llamacpp_available() else "torch"


def llamacpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def open_lm(spec: str, home: Path, engine: str = "auto", **options) -> LM:
    """Open ``spec`` (installed name, folder, .gguf file, hub id) on ``engine``. Options are the
    engine's own (torch: dtype, device; llamacpp: threads, n_ctx, numa)."""
    engine = choose_engine(engine, spec, home, options.get("device", "cpu"))
    if engine == "llamacpp" and not llamacpp_available():
        raise EngineMissing("the llama.cpp engine needs llama-cpp-python: run `bash launch/setup.sh` "
                            "(it builds llama-cpp-python 0.3.36 from source with native CPU flags, ~6 min on 2 cores)")
    module = importlib.import_module(ENGINES[engine])
    return module.open_model(spec, home, **options)


# ---- pending-forest bookkeeping shared by the engines ---------------------------------------------
def resolve_parents(parents: list[int] | None, n_new: int, n_pending: int, last_pending: int) -> list[int]:
    """Parents of the new nodes as pending indices (-1 = below the committed tokens), validated."""
    if parents is None:
        return [last_pending if i == 0 else n_pending + i - 1 for i in range(n_new)]
    if len(parents) != n_new:
        raise ValueError(f"{n_new} tokens but {len(parents)} parents")
    for i, p in enumerate(parents):
        if not -1 <= p < n_pending + i:
            raise ValueError(f"node {i}: parent {p} is not -1 or an earlier pending node (< {n_pending + i})")
    return list(parents)


@dataclass
class Plan:
    """A validated forward that has not touched the cache yet: what every engine's ``forward`` starts with."""

    tokens: list[int]
    every: list[int]  # parents of every pending node after the forward (pending indices, -1 = committed)
    depth: list[int]  # of every pending node (0: right after the committed tokens)
    rows: int  # the last ``rows`` nodes get logits
    first: int  # pending nodes before it
    committed: int  # committed tokens before it

    @property
    def linear(self) -> bool:
        """One chain after the committed tokens and the pending chain: plain causal attention."""
        return self.every == list(range(-1, len(self.every) - 1))

    @property
    def positions(self) -> list[int]:
        """Sequence positions of the new nodes."""
        return [self.committed + d for d in self.depth[self.first:]]


def plan_forward(pending: list[int], committed: int, tokens: list[int], parents: list[int] | None,
                 logits_for: int | None) -> Plan:
    """Validate a forward of ``tokens`` (under ``parents``) after ``committed`` tokens and the
    ``pending`` nodes, before any cache changes."""
    from .tree import pool_depths

    every = pending + resolve_parents(parents, len(tokens), len(pending), len(pending) - 1)
    return Plan(list(tokens), every, pool_depths(every), check_rows(logits_for, len(tokens)), len(pending), committed)


def check_rows(logits_for: int | None, n_new: int) -> int:
    """How many of the last rows get logits (``None``: all of them), validated."""
    if logits_for is None:
        return n_new
    if not 0 <= logits_for <= n_new:
        raise ValueError(f"logits_for={logits_for}: a forward of {n_new} tokens has 0..{n_new} rows")
    return logits_for


def check_path(path: list[int], parents: list[int]) -> None:
    """``path`` must be a root-to-node chain of pending nodes: it starts below the committed tokens."""
    prev = -1
    for n in path:
        if not 0 <= n < len(parents) or parents[n] != prev:
            raise ValueError(f"keep({path}): node {n} is not the child of {prev}; keep takes a root-to-node path")
        prev = n
