"""The llama.cpp engine: GGUF models on llama.cpp's CPU kernels behind the ``lm`` seam.

One model per process, memory-mapped; one ``llama_context`` per session, with a unified KV cache.

Sequence ids carry the tree. The committed tokens live in sequence 0. While the pending nodes form
one chain below the committed tokens (every prefill, every chain draft) they live in sequence 0
too, at consecutive positions, and ``keep`` of a prefix is one ``seq_rm``. Once they branch, pending
node k owns sequence 1 + k, and a node's KV cell belongs to its own sequence and to the sequence of
every node below it; before a forward, each new node's sequence gets the committed tokens and its
earlier-forwarded ancestors by ``seq_cp``. So every node attends to exactly the committed tokens,
its ancestors and itself, at position committed + depth. Committing the path that ends at node a:
``seq_keep(1 + a)`` (frees every other node), ``seq_cp(1 + a, 0)``, ``seq_keep(0)``.

Numerics: llama.cpp's CPU matmuls pick kernels by the number of rows, so a token's logits in a
q-token pass can differ slightly from a one-token step (DESIGN.md §7). Flash attention is off (its
blocked softmax is one more batch-dependent path and does not speed up the short contexts here);
the repacked weight layouts and tiled kernels stay on: they are the speed this engine is for.
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
from .lm import ModelInfo, Output

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


def open_model(spec: str, home: Path, threads: int | None = None, n_ctx: int = 4096, n_batch: int = 256,
               max_tree: int = 64, numa: bool = False, **_ignored) -> "LlamaCppLM":
    """Open the GGUF behind ``spec`` (a .gguf path or an installed default, see ``store.gguf_file``)."""
    path = store.gguf_file(spec, home)
    if path is None:
        raise store.ModelNotFound(f"'{spec}' has no GGUF file for the llama.cpp engine: pass a .gguf file or an "
                                  "installed default (`dovetail models install`), or use --engine torch")
    return LlamaCppLM(spec, path, threads, n_ctx, n_batch, max_tree, numa)


class LlamaCppLM:
    def __init__(self, name: str, path: Path, threads: int | None, n_ctx: int, n_batch: int, max_tree: int, numa: bool):
        import os

        L = _llama()
        _init_backend(numa)
        params = L.llama_model_default_params()
        params.n_gpu_layers = 0
        params.use_mmap = True
        self.model = L.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise store.ModelNotFound(f"llama.cpp could not load {path}: not a GGUF model it supports (run with -v for its log)")
        self.vocab_p = L.llama_model_get_vocab(self.model)
        n_vocab = L.llama_vocab_n_tokens(self.vocab_p)
        self.threads = threads or len(os.sched_getaffinity(0))
        self.n_ctx = min(n_ctx, L.llama_model_n_ctx_train(self.model))
        self.n_batch, self.n_seq = n_batch, max(2, min(max_tree + 1, 256))
        self.sessions: weakref.WeakSet = weakref.WeakSet()
        self.info = ModelInfo(
            name=name, engine="llamacpp", path=str(path), weight_format=format_name(_meta(self.model, "general.file_type")),
            vocab=self._vocab_strings(n_vocab), vocab_size=n_vocab, hidden_size=L.llama_model_n_embd(self.model),
            eos=[i for i in range(n_vocab) if L.llama_vocab_is_eog(self.vocab_p, i)], max_positions=self.n_ctx,
        )

    def _vocab_strings(self, n_vocab: int) -> list[str]:
        """Token texts in id order, padding rows included (Qwen2's GGUF pads 151,665 tokens to 151,936
        with "[PAD151665]"...; the installed tokenizer, converted from the same file, has them too)."""
        L = _llama()
        return [(L.llama_vocab_get_text(self.vocab_p, i) or b"").decode("utf-8", errors="replace") for i in range(n_vocab)]

    def session(self, features: bool = False) -> "LlamaCppSession":
        session = LlamaCppSession(self, features)
        self.sessions.add(session)
        return session

    def close(self) -> None:
        """Free the model; its sessions' contexts first (they point into it)."""
        for session in list(self.sessions):
            session.close()
        if self.model:
            _llama().llama_model_free(self.model)
            self.model = None


class LlamaCppSession:
    def __init__(self, owner: LlamaCppLM, features: bool):
        L = self.L = _llama()
        self.owner, self.features = owner, features
        params = L.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = owner.n_ctx, owner.n_batch, owner.n_batch
        params.n_seq_max = owner.n_seq
        params.n_threads = params.n_threads_batch = owner.threads
        params.kv_unified = True  # one cell pool: a cell can belong to many sequences (the tree)
        params.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.embeddings = features
        if features:
            params.pooling_type = L.LLAMA_POOLING_TYPE_NONE  # one hidden state per token
        params.no_perf = True
        self.ctx = L.llama_init_from_model(owner.model, params)
        if not self.ctx:
            raise MemoryError(f"llama.cpp could not create a context of {owner.n_ctx} tokens (out of memory?)")
        self.mem = L.llama_get_memory(self.ctx)
        self.batch = L.llama_batch_init(owner.n_batch, 0, owner.n_seq)
        self.length = 0  # committed tokens, in sequence 0
        self.pending: list[int] = []  # parent of each pending node (pending index, -1 = the committed tokens)
        self.linear = True  # pending nodes are one chain in sequence 0

    # ---- the seam -------------------------------------------------------------------------------
    def forward(self, tokens: list[int], parents: list[int] | None = None, logits_for: int | None = None) -> Output:
        n_pending = len(self.pending)
        every, depth, rows = lm.plan_forward(self.pending, len(tokens), parents, logits_for)
        chain = self.linear and every == list(range(-1, len(every) - 1))
        # every check before the cache changes: a refused forward leaves the state as it was
        if self.length + len(every) > self.owner.n_ctx:
            raise ValueError(f"{self.length} committed + {len(every)} pending tokens would pass this session's "
                             f"context of {self.owner.n_ctx} tokens")
        if not chain and len(every) >= self.owner.n_seq:
            raise ValueError(f"a tree of {len(every)} pending nodes: this engine holds at most {self.owner.n_seq - 1} "
                             "(raise max_tree when opening the model)")
        if not chain and len(tokens) > self.owner.n_batch:
            raise ValueError(f"a tree of {len(tokens)} nodes is larger than the batch ({self.owner.n_batch})")
        try:
            if chain:
                logits, feats = self._forward_chain(tokens, self.length + n_pending, rows)
            else:
                if self.linear:
                    self._branch_out()
                logits, feats = self._forward_tree(tokens, every, n_pending, depth, rows)
        except Exception:
            self._forget(n_pending, len(every))
            raise
        self.pending = every
        return Output(logits, feats)

    def _forget(self, first: int, end: int) -> None:
        """Undo a failed forward: drop what it wrote (pending nodes first..end-1) from the cache."""
        L = self.L
        if self.linear:
            L.llama_memory_seq_rm(self.mem, 0, self.length + first, -1)
        else:
            for k in range(first, end):
                L.llama_memory_seq_rm(self.mem, 1 + k, -1, -1)

    def keep(self, path: list[int]) -> None:
        lm.check_path(path, self.pending)
        L = self.L
        if self.linear:
            L.llama_memory_seq_rm(self.mem, 0, self.length + len(path), -1)
        elif path:
            last = 1 + path[-1]
            L.llama_memory_seq_keep(self.mem, last)  # frees every node off the path
            L.llama_memory_seq_cp(self.mem, last, 0, -1, -1)
            L.llama_memory_seq_keep(self.mem, 0)
        else:
            L.llama_memory_seq_keep(self.mem, 0)
        self.length += len(path)
        self.pending, self.linear = [], True

    def truncate(self, length: int) -> None:
        L = self.L
        if not self.linear:
            L.llama_memory_seq_keep(self.mem, 0)
        self.length = min(self.length, length)
        L.llama_memory_seq_rm(self.mem, 0, self.length, -1)
        self.pending, self.linear = [], True

    def close(self) -> None:
        if self.ctx:
            self.L.llama_batch_free(self.batch)
            self.L.llama_free(self.ctx)
            self.ctx = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the library may be gone already
            pass

    # ---- batches ----------------------------------------------------------------------------------
    def _forward_chain(self, tokens: list[int], start: int, rows: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Consecutive positions in sequence 0, in chunks of the batch size (a long prefill)."""
        logits, feats, n = [], [], len(tokens)
        for lo in range(0, n, self.owner.n_batch):
            chunk = tokens[lo : lo + self.owner.n_batch]
            want = [lo + i >= n - rows for i in range(len(chunk))]
            self._decode(chunk, [start + lo + i for i in range(len(chunk))], [[0]] * len(chunk), want)
            logits += [self._logits(i) for i in range(len(chunk)) if want[i]]
            if self.features:
                feats += [self._embedding(i) for i in range(len(chunk))]
        return _stack(logits, self.owner.info.vocab_size), (torch.from_numpy(np.stack(feats)) if self.features else None)

    def _forward_tree(self, tokens, every, n_pending, depth, rows) -> tuple[torch.Tensor, torch.Tensor | None]:
        L, q = self.L, len(tokens)
        seqs = [[1 + k] for k in range(n_pending, len(every))]  # node -> the sequences its cell joins
        for k in range(len(every) - 1, n_pending - 1, -1):  # children after parents: walk back, pass ids up
            p = every[k]
            if p >= n_pending:
                seqs[p - n_pending] += seqs[k - n_pending]
        for k in range(n_pending, len(every)):
            top = k  # the first ancestor forwarded in this call
            while every[top] >= n_pending:
                top = every[top]
            src = 0 if every[top] < 0 else 1 + every[top]
            L.llama_memory_seq_cp(self.mem, src, 1 + k, -1, -1)
        self._decode(tokens, [self.length + depth[k] for k in range(n_pending, len(every))], seqs,
                     [i >= q - rows for i in range(q)])
        logits = _stack([self._logits(i, copy=False) for i in range(q - rows, q)], self.owner.info.vocab_size)  # one copy
        feats = torch.from_numpy(np.stack([self._embedding(i) for i in range(q)])) if self.features else None
        return logits, feats

    def _branch_out(self) -> None:
        """Move a chain of pending nodes out of sequence 0 into their own sequences (node k: 1 + k)."""
        L = self.L
        for k in range(len(self.pending)):
            L.llama_memory_seq_cp(self.mem, 0, 1 + k, -1, self.length + k + 1)
        L.llama_memory_seq_rm(self.mem, 0, self.length, -1)
        self.linear = False

    def _decode(self, tokens, positions, seqs, want) -> None:
        b = self.batch
        for i, (tok, pos, ids, w) in enumerate(zip(tokens, positions, seqs, want)):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, len(ids), self.features or w
            for j, s in enumerate(ids):
                b.seq_id[i][j] = s
        b.n_tokens = len(tokens)
        rc = self.L.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed ({rc}): the KV cache of {self.owner.n_ctx} tokens is full or a batch was refused")

    def _logits(self, i: int, copy: bool = True) -> np.ndarray:
        """Row i's logits; a view into llama.cpp's buffer (valid until the next decode) unless copied."""
        row = np.ctypeslib.as_array(self.L.llama_get_logits_ith(self.ctx, i), shape=(self.owner.info.vocab_size,))
        return row.copy() if copy else row

    def _embedding(self, i: int) -> np.ndarray:
        p = self.L.llama_get_embeddings_ith(self.ctx, i)
        return np.ctypeslib.as_array(p, shape=(self.owner.info.hidden_size,)).copy()


def _stack(rows: list[np.ndarray], width: int) -> torch.Tensor:
    return torch.from_numpy(np.stack(rows)) if rows else torch.empty(0, width)
