"""Every draft kind in one table: how a ``-md`` spec names it, how it opens, how it drafts, and how
several Clients share it. The only place that tells kinds apart.

A new draft kind is a new file with its ``drafter.Drafter`` (and what it opens, if anything) and one
``DraftKind`` line in ``KINDS`` below; the client loop, the server and the bench never change.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from . import lm, ngram
from .config import DraftConfig
from .drafter import Choice, Chooser, Drafter, DraftLM, HeadDrafter, NoDraft

LOOKUP = "ngram"  # -md ngram, -md ngram+DRAFT


@dataclass(frozen=True)
class Opening:
    """Where and how a draft opens (``open_draft``'s arguments after the spec)."""

    home: Path
    dtype: str = "auto"
    device: str = "cpu"
    engine: str = "auto"
    threads: int | None = None
    sessions: int = 1


def _same(opened):
    return opened


@dataclass(frozen=True)
class DraftKind:
    """One draft kind. ``names(spec, home)``: a ``-md`` string names it; ``owns(opened)``: an opened
    draft (or an object a caller passes instead of a spec) is its; ``open(spec or owned, Opening)``
    -> (opened draft, its tokenizer or None); ``drafter(opened, config, curve)`` -> a ``Drafter``;
    ``share(opened)``: the same, ready for Clients in several threads (a server's requests)."""

    name: str
    names: Callable[[str, Path], bool]
    owns: Callable[[object], bool]
    open: Callable[[object, Opening], tuple]
    drafter: Callable[[object, DraftConfig, dict | None], Drafter]
    share: Callable[[object], object] = _same


def model_part(spec: str) -> str | None:
    """The model a draft spec names: None for ``ngram``, DRAFT for ``ngram+DRAFT``, else the spec."""
    return None if spec == LOOKUP else spec[len(LOOKUP) + 1:] if spec.startswith(LOOKUP + "+") else spec


# ---- the kinds' openers ---------------------------------------------------------------------------
def _open_choice(spec, how: Opening) -> tuple:
    """``ngram+DRAFT`` (or a ``Choice`` whose model is still a spec or a module)."""
    lookup, inner = (spec.lookup, spec.model) if isinstance(spec, Choice) else (ngram.Lookup(), model_part(spec))
    if inner == "":
        raise ValueError(f"-md {spec}: after 'ngram+' name a draft model or head, e.g. ngram+qwen2.5-coder-0.5b")
    model, tokenizer = _open(inner, how)
    if isinstance(model, (ngram.Lookup, Choice)) or (model is None and not isinstance(spec, Choice)):
        raise ValueError(f"-md {spec}: after 'ngram+' name a draft model or head, e.g. ngram+qwen2.5-coder-0.5b")
    return Choice(lookup, model), tokenizer


def _is_head(spec: str, home: Path) -> bool:
    from .draft_head import is_head_folder

    path = Path(spec).expanduser()
    return path.is_dir() and is_head_folder(path)


def _owns_head(opened) -> bool:
    from .draft_head import DraftHead

    return isinstance(opened, DraftHead)


def _open_head(spec, how: Opening) -> tuple:
    """A Dovetail head folder: bfloat16 on a CPU with BF16 instructions, else float32 (unless told)."""
    if _owns_head(spec):
        return spec, None
    from . import draft_head, store
    from .lm_torch import cpu_has_bf16, resolve_dtype

    cpu_default = how.dtype in ("auto", "int8") and how.device == "cpu"
    name = ("bfloat16" if cpu_has_bf16() else "float32") if cpu_default else how.dtype
    head = draft_head.load_head(Path(spec).expanduser(), how.home, resolve_dtype(name, how.device), how.device)
    return head, store.load_tokenizer(head.config.target, how.home)


def _open_lm(spec, how: Opening) -> tuple:
    """A small LM (installed name, folder, .gguf, hub id, or a torch module) on ``how.engine``."""
    if hasattr(spec, "session"):
        return spec, None
    if isinstance(spec, torch.nn.Module):
        return lm.open_lm("module", how.home, "torch", model=spec, device=how.device), None
    from . import store

    engine, dtype = lm.choose_engine(how.engine, str(spec), how.home, how.device), how.dtype
    if engine == "torch" and dtype == "auto":
        dtype = "float16" if how.device.startswith("cuda") else "int8"
    model = lm.open_lm(str(spec), how.home, engine, dtype=dtype, device=how.device, threads=how.threads,
                       sessions=how.sessions)
    return model, getattr(model, "tokenizer", None) or store.load_tokenizer(str(spec), how.home)


def _share_lm(model):
    from .lm_shared import SharedLM

    batches = getattr(getattr(model, "info", None), "batches", False)
    return model if isinstance(model, SharedLM) or not batches else SharedLM(model)


# ---- the table: first match wins (a spec is tried against ``names`` in this order) ----------------
KINDS: tuple[DraftKind, ...] = (
    DraftKind("ngram", lambda spec, home: spec == LOOKUP, lambda d: isinstance(d, ngram.Lookup),
              lambda d, how: (d if isinstance(d, ngram.Lookup) else ngram.Lookup(), None), ngram.NgramDrafter),
    DraftKind("ngram+", lambda spec, home: spec.startswith(LOOKUP + "+"), lambda d: isinstance(d, Choice),
              _open_choice, lambda c, config, curve: Chooser(ngram.NgramDrafter(c.lookup, config, curve),
                                                            make_drafter(c.model, config, curve)),
              lambda c: Choice(c.lookup, share(c.model))),
    DraftKind("head", _is_head, _owns_head, _open_head, HeadDrafter),
    DraftKind("lm", lambda spec, home: True, lambda d: hasattr(d, "session") or isinstance(d, torch.nn.Module),
              _open_lm, DraftLM, _share_lm),
)


def kind_of(draft, home: Path | None = None) -> DraftKind:
    """The kind a spec names or an opened draft belongs to."""
    for kind in KINDS:
        if kind.names(draft, home) if isinstance(draft, (str, Path)) else kind.owns(draft):
            return kind
    raise TypeError(f"not a draft: {draft!r} (a spec such as 'ngram' or a model name, or an opened draft)")


def _open(draft, how: Opening) -> tuple:
    if draft is None:
        return None, None
    spec = str(draft) if isinstance(draft, Path) else draft
    return kind_of(spec, how.home).open(spec, how)


def open_draft(draft, home: Path, dtype: str = "auto", device: str = "cpu", engine: str = "auto",
               threads: int | None = None, sessions: int = 1) -> tuple:
    """-> (draft, tokenizer or None) for ``make_drafter``. ``draft``: None (no draft), a spec
    (``ngram``: lookup in the context and earlier outputs; ``ngram+DRAFT``: that, else DRAFT; a Dovetail
    head folder, detected by its config, or a small LM: installed name, folder, .gguf, hub id), an
    opened ``lm.LM``, a ``DraftHead``, a ``ngram.Lookup`` or ``Choice``, or a torch causal LM module
    (tests, the bench).

    A small LM runs on ``engine`` (auto: llama.cpp for a GGUF draft on the CPU, torch on CUDA).
    Torch precision: ``dtype`` auto = float16 on CUDA, int8 dynamic quantization on the CPU; a head
    runs in bfloat16 on a CPU with BF16 instructions, else float32. Draft precision never changes
    the output (verification is lossless); it moves acceptance a little and draft time a lot (2-core
    dev CPU: one 0.5B token 148 / 75 / 41 ms in torch float32 / bfloat16 / int8, 12-15 ms on llama.cpp).
    """
    return _open(draft, Opening(home, dtype, device, engine, threads, sessions))


def make_drafter(draft, config: DraftConfig, verify_curve: dict | None = None) -> Drafter:
    """The ``Drafter`` for an opened draft (``open_draft``); None = no draft (the target decodes one
    token per step: the baseline the bench calls `target`). Each kind sets the caps ``config``
    leaves open for the curve (``cost.sized``: wider where the verifier's curve is flat)."""
    return NoDraft() if draft is None else kind_of(draft).drafter(draft, config, verify_curve)


def share(draft):
    """An opened draft made ready for several Clients drafting at once in their own threads (the
    server): a small LM whose engine batches sessions' forwards through one ``lm_shared.SharedLM``, so
    their draft forwards that wait together run as one pass. A lookup index is already shared under
    its lock; a head is not batched."""
    return None if draft is None else kind_of(draft).share(draft)
