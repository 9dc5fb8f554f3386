"""The llama.cpp engine: GGUF models on llama.cpp's CPU kernels behind the ``lm`` seam.

One model per process, memory-mapped, and one ``llama_context`` with a unified KV cache: a pool of
``kv_cells`` cells that every session of the model shares (the KV budget), so one ``llama_decode``
can run several sessions' tokens at once (``forward_batch``: the verifier batches sessions).

Sequence ids carry the sessions and their trees; they are lent from the context's 256 by a pool.
A session's committed tokens live in its own *base* sequence. While its pending nodes form one chain
below the committed tokens (every prefill, every chain draft) they live in the base sequence too, at
consecutive positions, and ``keep`` of a prefix is one ``seq_rm``. Once they branch, each pending
node borrows a sequence, and a node's KV cell belongs to its own sequence and to the sequence of
every node below it; before a forward, each new node's sequence gets the committed tokens and its
earlier-forwarded ancestors by ``seq_cp``. So every node attends to exactly the committed tokens,
its ancestors and itself, at position committed + depth, and never to another session's cells.
Committing the path that ends at node a: ``seq_cp(a's sequence, base)``, then ``seq_rm`` of every
node's sequence (cells off the path are freed) and the borrowed ids go back to the pool. Nothing
here may call ``seq_keep``: in a shared pool it would free every other session.

Kernels: before the first model opens, ``kernels.verdict()`` says which of the build's kernel paths
work on this CPU (probed once in a child process, kept per build and CPU): the repacked weight
layouts (and AMX tiles where built in) when they pass, else the plain kernels (``use_extra_bufts``
off), and the start-up line says which and why.

Numerics: llama.cpp's CPU matmuls pick kernels by the number of rows, so a token's logits in a
q-token pass can differ slightly from a one-token step (DESIGN.md §7). Flash attention is off by
default: it sums V in float16 and splits a one-token step's cells across threads from 512 cells on, so
on float32 files a q-token pass and a one-token step differ by up to ~0.008 in a logit (tiny GGUFs in
the tests: greedy output no longer identical). Its gain is in a crowded pool: off, every step scans
the cells of every session in the unified pool (other sessions' are masked, but read); on, it skips
them (bench/NOTES.md, session 13). The repacked weight layouts and tiled kernels stay on: they are the
speed this engine is for.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import weakref
from pathlib import Path

import numpy as np
import torch

from . import lm, store
from .lm import CacheFull, ModelInfo, Output

log = logging.getLogger(__name__)

_init_lock = threading.Lock()
_backend_ready = False
# llama.cpp's own warnings are about the file (e.g. Qwen2's "control-looking token") and are not the
# user's to act on: they show with `dovetail -v`; its errors always show.
_LLAMA_LOG_LEVELS = {1: logging.DEBUG, 2: logging.DEBUG, 3: logging.DEBUG, 4: logging.ERROR, 5: logging.DEBUG}


def _llama():
    import llama_cpp

    return llama_cpp


def _init_backend(numa: bool) -> None:
    """Once per process: route llama.cpp's log to ``logging``, start the backend and its NUMA mode."""
    global _backend_ready, _log_callback
    with _init_lock:
        if _backend_ready:
            return
        L = _llama()

        @L.llama_log_callback
        def _log_callback(level, text, _user):  # kept in a global: the C side holds the pointer
            if text and level >= 3:
                log.log(_LLAMA_LOG_LEVELS.get(level, logging.DEBUG), "llama.cpp: %s", text.decode(errors="replace").rstrip())

        L.llama_log_set(_log_callback, ctypes.c_void_p(0))
        L.llama_backend_init()
        if numa:  # the verifier already pinned the process to its node: follow that CPU mask
            L.llama_numa_init(L.GGML_NUMA_STRATEGY_NUMACTL)
        _backend_ready = True


def format_name(file_type: int | None) -> str:
    """"Q4_K_M", "Q4_0", "BF16", ... for a GGUF ``general.file_type``."""
    import gguf

    try:
        return gguf.LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except (TypeError, ValueError):
        return "unknown"


def weight_format(path: Path) -> str:
    """The weight format of a GGUF file on disk (reads its metadata; an opened model asks llama.cpp)."""
    import gguf

    field = gguf.GGUFReader(str(path)).get_field("general.file_type")
    return format_name(None if field is None else field.parts[field.data[0]][0])


def _meta(model, key: str) -> str | None:
    buf = ctypes.create_string_buffer(256)
    n = _llama().llama_model_meta_val_str(model, key.encode(), buf, len(buf))
    return buf.value.decode() if n >= 0 else None


_FTYPES = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
           "bf16": "LLAMA_FTYPE_MOSTLY_BF16"}


def requantize(src: Path, dst: Path, fmt: str, threads: int | None = None) -> None:
    """Write ``src`` in weight format ``fmt`` with llama.cpp's own quantizer (``llama_model_quantize``,
    requantizing allowed). A file already in ``fmt`` is linked, not rewritten."""
    import os

    if weight_format(src) == fmt.upper():
        os.symlink(src.resolve(), dst)
        return
    L = _llama()
    _init_backend(numa=False)
    params = L.llama_model_quantize_default_params()
    params.ftype = getattr(L, _FTYPES[fmt])
    params.allow_requantize = True
    params.nthread = threads or len(os.sched_getaffinity(0))
    rc = L.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama.cpp could not write {fmt} from {src} (code {rc}); is the disk full?")


def write_format(home: Path, name: str, fmt: str) -> tuple[Path, bool]:
    """An installed default's GGUF in weight format ``fmt`` beside it (``store.format_path``), written with
    llama.cpp's quantizer unless it is there already: (its path, whether it was written now). A
    requantization of a Q4_K_M file is a different model from the file: compare it with llama.cpp on
    the same file."""
    if fmt not in store.FORMATS:
        raise ValueError(f"unknown format '{fmt}'; choose from {', '.join(store.FORMATS)}")
    src, dst = home / "gguf" / f"{name}.gguf", store.format_path(home, name, fmt)
    if not src.is_file():
        raise store.ModelNotFound(f"{src} is missing: run `dovetail models install {name}` first")
    if dst.is_file():
        return dst, False
    tmp = dst.with_suffix(".partial")
    requantize(src, tmp, fmt)
    tmp.rename(dst)
    return dst, True


def open_model(spec: str, home: Path, threads: int | None = None, n_ctx: int = 4096, n_batch: int = 256,
               max_tree: int = 64, numa: bool = False, sessions: int = 1, kv_cells: int | None = None,
               flash_attn: bool = False, **_ignored) -> "LlamaCppLM":
    """Open the GGUF behind ``spec`` (a .gguf path or an installed default, see ``store.gguf_file``).
    ``n_ctx``: the most tokens one session holds; ``kv_cells``: the KV pool all sessions share
    (default ``n_ctx`` x ``sessions``), capped to a quarter of the memory available now; ``flash_attn``:
    llama.cpp's flash attention (see the module's docstring)."""
    path = store.gguf_file(spec, home)
    if path is None:
        raise store.ModelNotFound(f"'{spec}' has no GGUF file for the llama.cpp engine: pass a .gguf file or an "
                                  "installed default (`dovetail models install`), or use --engine torch")
    from . import kernels

    found = kernels.verdict(progress=log.warning)
    return LlamaCppLM(spec, path, threads, n_ctx, n_batch, max_tree, numa, kv_cells or n_ctx * sessions,
                      kernels=found, flash_attn=flash_attn)


N_SEQ = 256  # llama.cpp's LLAMA_MAX_SEQ: sequence ids 0..255, lent to sessions and tree nodes


class LlamaCppLM:
    def __init__(self, name: str, path: Path, threads: int | None, n_ctx: int, n_batch: int, max_tree: int, numa: bool,
                 kv_cells: int | None = None, kernels=None, flash_attn: bool = False):
        """``kernels``: the probe's ``kernels.Verdict`` (None: the build's fastest kernels, unprobed)."""
        import os

        L = self.L = _llama()
        _init_backend(numa)
        params = L.llama_model_default_params()
        params.n_gpu_layers = 0
        params.use_mmap = True
        params.use_extra_bufts = kernels is None or kernels.config.extra_bufts
        self.model = L.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise store.ModelNotFound(f"llama.cpp could not load {path}: not a GGUF model it supports (run with -v for its log)")
        self.vocab_p = L.llama_model_get_vocab(self.model)
        n_vocab = L.llama_vocab_n_tokens(self.vocab_p)
        self.threads = threads or len(os.sched_getaffinity(0))
        self.n_ctx = min(n_ctx, L.llama_model_n_ctx_train(self.model))
        self.n_batch = n_batch
        self.n_seq = min(N_SEQ, n_batch)  # llama.cpp aborts when n_seq_max passes the batch (its output buffer)
        self.max_tree = min(max_tree, self.n_seq - 1)
        self.info = ModelInfo(
            name=name, engine="llamacpp", path=str(path), weight_format=format_name(_meta(self.model, "general.file_type")),
            vocab=self._vocab_strings(n_vocab), vocab_size=n_vocab, hidden_size=L.llama_model_n_embd(self.model),
            eos=[i for i in range(n_vocab) if L.llama_vocab_is_eog(self.vocab_p, i)], max_positions=self.n_ctx,
            batches=True, kernels=kernels.describe() if kernels is not None else "unprobed (the build's fastest)",
        )
        self.kv_cells = self._pool_size(kv_cells or self.n_ctx)
        self.lock = threading.RLock()  # one decode at a time per context; sessions may live in several threads
        self.free_seqs = list(range(self.n_seq - 1, -1, -1))  # pop() lends the lowest id
        self.sessions: weakref.WeakSet = weakref.WeakSet()
        self.embeddings = True
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = self.kv_cells, n_batch, n_batch, self.n_seq
        cp.n_threads = cp.n_threads_batch = self.threads
        cp.kv_unified = True  # one cell pool: a cell can belong to many sequences (the tree), sessions share it
        cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else L.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cp.embeddings, cp.pooling_type = True, L.LLAMA_POOLING_TYPE_NONE  # one hidden state per token, when asked for
        cp.no_perf = True
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise MemoryError(f"llama.cpp could not create a KV cache of {self.kv_cells} tokens (out of memory?): "
                              "lower --ctx-size or --max-sessions")
        self.kv_cells = L.llama_n_ctx(self.ctx)  # llama.cpp may round the pool up
        self.mem = L.llama_get_memory(self.ctx)
        self.batch = L.llama_batch_init(n_batch, 0, self.n_seq)

    def _vocab_strings(self, n_vocab: int) -> list[str]:
        """Token texts in id order, padding rows included (Qwen2's GGUF pads 151,665 tokens to 151,936
        with "[PAD151665]"...; the installed tokenizer, converted from the same file, has them too)."""
        L = self.L
        return [(L.llama_vocab_get_text(self.vocab_p, i) or b"").decode("utf-8", errors="replace") for i in range(n_vocab)]

    def kv_bytes_per_token(self) -> int:
        """Bytes one cached token takes (f16 keys and values in every layer)."""
        L = self.L
        head_dim = L.llama_model_n_embd(self.model) // max(1, L.llama_model_n_head(self.model))
        return L.llama_model_n_layer(self.model) * 2 * L.llama_model_n_head_kv(self.model) * head_dim * 2

    def _pool_size(self, wanted: int) -> int:
        import psutil

        fits = psutil.virtual_memory().available // 4 // max(1, self.kv_bytes_per_token())
        cells = max(self.n_ctx, min(wanted, fits))
        if cells < wanted:
            log.warning("KV pool capped at %d tokens (a quarter of the memory available) instead of %d", cells, wanted)
        return cells

    def session(self, features: bool = False) -> "LlamaCppSession":
        session = LlamaCppSession(self, features)
        self.sessions.add(session)
        return session

    def close(self) -> None:
        """Free the context and the model (sessions left open become unusable)."""
        with self.lock:
            for session in list(self.sessions):
                session.closed = True
            if self.ctx:
                self.L.llama_batch_free(self.batch)
                self.L.llama_free(self.ctx)
                self.ctx = None
            if self.model:
                self.L.llama_model_free(self.model)
                self.model = None

    # ---- one decode over several sessions -------------------------------------------------------
    def forward_batch(self, items: list[tuple]) -> list:
        """``items``: ``(session, tokens, parents, logits_for)``, at most one per session. Runs as many
        as fit (batch rows, sequence ids) in ONE ``llama_decode``, in order, and returns per item its
        ``Output``, the exception that refused it (the session is as it was), or None: no room in this
        pass, ask again after the others' ``keep``. A chain longer than the batch (a prefill) runs alone,
        in chunks, when it comes first."""
        results: list = [None] * len(items)
        with self.lock:
            staged, rows = [], []
            try:
                for i, (s, tokens, parents, logits_for) in enumerate(items):
                    try:
                        plan = s._plan(tokens, parents, logits_for)
                        if not staged and s._chain(plan) and len(tokens) > self.n_batch:
                            results[i] = s.forward(tokens, parents, logits_for)
                            break
                        if len(rows) + len(tokens) > self.n_batch or s._seqs_needed(plan) > len(self.free_seqs):
                            if staged:
                                continue  # no room in this pass
                            raise CacheFull(f"a tree of {len(plan.every)} pending nodes needs more sequence ids than "
                                            f"are free ({len(self.free_seqs)})")
                        staged.append((i, s, plan, len(rows)))
                        rows += s._stage(plan)
                    except (ValueError, CacheFull) as exc:
                        results[i] = exc
                if staged:
                    self._decode(rows, any(s.features for _, s, _, _ in staged))
            except Exception as exc:  # nothing staged stays in the cache
                for i, s, plan, _ in staged:
                    s._forget(plan)
                    results[i] = exc
                if isinstance(exc, CacheFull) and len(staged) > 1:  # the pool is nearly full: the first alone,
                    first = staged[0][0]                            # the rest in a later pass
                    results[first] = self.forward_batch([items[first]])[0]
                    for i, *_ in staged[1:]:
                        results[i] = None
                elif not isinstance(exc, CacheFull):
                    raise
                return results
            for i, s, plan, first_row in staged:
                results[i] = s._finish(plan, first_row)
        return results

    def _decode(self, rows: list[tuple], features: bool) -> None:
        """rows: (token, position, sequence ids, wants logits)."""
        L, b = self.L, self.batch
        if features != self.embeddings:  # with embeddings on, every row is an output: only when asked for
            L.llama_set_embeddings(self.ctx, features)
            self.embeddings = features
        for i, (tok, pos, ids, want) in enumerate(rows):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, len(ids), features or want
            for j, q in enumerate(ids):
                b.seq_id[i][j] = q
        b.n_tokens = len(rows)
        rc = L.llama_decode(self.ctx, b)
        if rc == 1:
            raise CacheFull(f"the KV cache pool of {self.kv_cells} tokens is full: finish or end other sessions, "
                            "or give the verifier a larger --max-sessions / --ctx-size")
        if rc != 0:
            raise RuntimeError(f"llama_decode failed ({rc})")

    def _lend(self, n: int) -> list[int]:
        if n > len(self.free_seqs):
            raise CacheFull(f"no free sequence ids ({self.n_seq} in all, shared by sessions and tree nodes): "
                            "fewer sessions or smaller trees")
        return [self.free_seqs.pop() for _ in range(n)]

    def _give_back(self, seqs: list[int]) -> None:
        for q in seqs:
            self.L.llama_memory_seq_rm(self.mem, q, -1, -1)
        self.free_seqs += seqs
        self.free_seqs.sort(reverse=True)

    def _logits(self, i: int, copy: bool = True) -> np.ndarray:
        """Row i's logits; a view into llama.cpp's buffer (valid until the next decode) unless copied."""
        row = np.ctypeslib.as_array(self.L.llama_get_logits_ith(self.ctx, i), shape=(self.info.vocab_size,))
        return row.copy() if copy else row

    def _embedding(self, i: int) -> np.ndarray:
        p = self.L.llama_get_embeddings_ith(self.ctx, i)
        return np.ctypeslib.as_array(p, shape=(self.info.hidden_size,)).copy()


class LlamaCppSession:
    def __init__(self, owner: LlamaCppLM, features: bool):
        self.owner, self.features, self.closed = owner, features, False
        with owner.lock:
            self.seq = owner._lend(1)[0]  # the base sequence: committed tokens (and a chain of pending ones)
        self.node_seqs: list[int] = []  # once branched: the sequence of each pending node
        self.length = 0  # committed tokens
        self.pending: list[int] = []  # parent of each pending node (pending index, -1 = the committed tokens)
        self.linear = True  # pending nodes are one chain in the base sequence

    # ---- the seam -------------------------------------------------------------------------------
    def forward(self, tokens: list[int], parents: list[int] | None = None, logits_for: int | None = None) -> Output:
        with self.owner.lock:
            plan = self._plan(tokens, parents, logits_for)
            if self._chain(plan):
                return self._forward_chain(plan)
            (out,) = self.owner.forward_batch([(self, tokens, parents, logits_for)])
        if isinstance(out, Exception):
            raise out
        return out

    def keep(self, path: list[int]) -> None:
        lm.check_path(path, self.pending)
        L, owner = self.owner.L, self.owner
        with owner.lock:
            self._check_open()
            if self.linear:
                L.llama_memory_seq_rm(owner.mem, self.seq, self.length + len(path), -1)
            else:
                if path:
                    L.llama_memory_seq_cp(owner.mem, self.node_seqs[path[-1]], self.seq, -1, -1)
                owner._give_back(self.node_seqs)  # frees every cell off the path
                self.node_seqs = []
            self.length += len(path)
            self.pending, self.linear = [], True

    def truncate(self, length: int) -> None:
        owner = self.owner
        with owner.lock:
            self._check_open()
            owner._give_back(self.node_seqs)
            self.node_seqs = []
            self.length = min(self.length, length)
            owner.L.llama_memory_seq_rm(owner.mem, self.seq, self.length, -1)
            self.pending, self.linear = [], True

    def close(self) -> None:
        with self.owner.lock:
            if not self.closed:
                self.owner._give_back([self.seq, *self.node_seqs])
                self.node_seqs, self.closed = [], True

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the library may be gone already
            pass

    # ---- planning, staging and reading one forward (a batch may hold several sessions') ----------
    def _check_open(self) -> None:
        if self.closed or not self.owner.ctx:
            raise RuntimeError("this session is closed")

    def _plan(self, tokens, parents, logits_for) -> lm.Plan:
        """Every check before the cache changes: a refused forward leaves the state as it was."""
        self._check_open()
        plan = lm.plan_forward(self.pending, self.length, tokens, parents, logits_for)
        every, chain = plan.every, self._chain(plan)
        if self.length + len(every) > self.owner.n_ctx:
            raise ValueError(f"{self.length} committed + {len(every)} pending tokens would pass this session's "
                             f"context of {self.owner.n_ctx} tokens")
        if not chain and len(every) > self.owner.max_tree:
            raise ValueError(f"a tree of {len(every)} pending nodes: this engine holds at most {self.owner.max_tree} "
                             "(raise max_tree when opening the model)")
        if not chain and len(tokens) > self.owner.n_batch:
            raise ValueError(f"a tree of {len(tokens)} nodes is larger than the batch ({self.owner.n_batch})")
        return plan

    def _chain(self, plan: lm.Plan) -> bool:
        """One chain in the base sequence (no node has branched out of it yet)."""
        return self.linear and plan.linear

    def _seqs_needed(self, plan: lm.Plan) -> int:
        return 0 if self._chain(plan) else len(plan.every) - len(self.node_seqs)

    def _stage(self, plan: lm.Plan) -> list[tuple]:
        """Lend and fill the new nodes' sequences; the batch rows (token, position, sequence ids, wants logits)."""
        q, every, first = len(plan.tokens), plan.every, plan.first
        want = [i >= q - plan.rows for i in range(q)]
        if self._chain(plan):
            start = self.length + first
            return [(t, start + i, [self.seq], want[i]) for i, t in enumerate(plan.tokens)]
        L, mem = self.owner.L, self.owner.mem
        if self.linear:
            self._branch_out()
        self.node_seqs += self.owner._lend(len(every) - first)
        ids = [[self.node_seqs[k]] for k in range(first, len(every))]  # node -> the sequences its cell joins
        for k in range(len(every) - 1, first - 1, -1):  # children after parents: walk back, pass ids up
            if every[k] >= first:
                ids[every[k] - first] += ids[k - first]
        for k in range(first, len(every)):
            top = k  # the first ancestor forwarded in this call
            while every[top] >= first:
                top = every[top]
            src = self.seq if every[top] < 0 else self.node_seqs[every[top]]
            L.llama_memory_seq_cp(mem, src, self.node_seqs[k], -1, -1)
        return [(plan.tokens[i], self.length + plan.depth[first + i], ids[i], want[i]) for i in range(q)]

    def _finish(self, plan: lm.Plan, first_row: int) -> Output:
        """Read this forward's rows of the last decode (they start at batch row ``first_row``)."""
        owner, q = self.owner, len(plan.tokens)
        rows = range(first_row + q - plan.rows, first_row + q)
        logits = _stack([owner._logits(i, copy=False) for i in rows], owner.info.vocab_size)  # one copy
        feats = (torch.from_numpy(np.stack([owner._embedding(first_row + i) for i in range(q)]))
                 if self.features else None)
        self.pending = plan.every
        return Output(logits, feats)

    def _forget(self, plan: lm.Plan) -> None:
        """Undo a staged forward that did not run: drop what it wrote to the cache, give back its ids."""
        if self.linear:
            self.owner.L.llama_memory_seq_rm(self.owner.mem, self.seq, self.length + plan.first, -1)
        else:
            self.owner._give_back(self.node_seqs[plan.first:])
            del self.node_seqs[plan.first:]

    def _branch_out(self) -> None:
        """Move a chain of pending nodes out of the base sequence into sequences of their own."""
        L, mem = self.owner.L, self.owner.mem
        self.node_seqs = self.owner._lend(len(self.pending))
        for k, q in enumerate(self.node_seqs):
            L.llama_memory_seq_cp(mem, self.seq, q, -1, self.length + k + 1)
        L.llama_memory_seq_rm(mem, self.seq, self.length, -1)
        self.linear = False

    def _forward_chain(self, plan: lm.Plan) -> Output:
        """Consecutive positions in the base sequence, in chunks of the batch size (a long prefill)."""
        owner, n = self.owner, len(plan.tokens)
        rows = self._stage(plan)
        logits, feats = [], []
        for lo in range(0, n, owner.n_batch):
            chunk = rows[lo : lo + owner.n_batch]
            try:
                owner._decode(chunk, self.features)
            except Exception:
                self._forget(plan)
                raise
            logits += [owner._logits(i) for i in range(len(chunk)) if chunk[i][3]]
            if self.features:
                feats += [owner._embedding(i) for i in range(len(chunk))]
        self.pending = plan.every
        return Output(_stack(logits, owner.info.vocab_size), torch.from_numpy(np.stack(feats)) if self.features else None)


def _stack(rows: list[np.ndarray], width: int) -> torch.Tensor:
    return torch.from_numpy(np.stack(rows)) if rows else torch.empty(0, width)
