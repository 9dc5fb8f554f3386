"""The torch engine: transformers models behind the ``lm`` seam; the exact float32 reference.

Loads installed defaults (their safetensors folder), folders, GGUF files (dequantized) and hub ids.
A session's cache is a transformers ``DynamicCache`` holding the committed tokens, then the pending
nodes in the order they were forwarded; a tree forward sees them through a boolean attention mask
(every node: the committed tokens, its pending ancestors and itself). No sockets here.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import DynamicCache

from . import lm, store, tree
from .lm import ModelInfo, Output

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ALONE_ROWS = 16  # a forward longer than this runs alone in ``forward_batch`` (the batch pads to the longest)


def cpu_has_bf16() -> bool:
    """True where the CPU has native bfloat16 math (AVX-512 BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def resolve_dtype(name: str, device: str = "cpu") -> torch.dtype:
    if name == "auto":
        if device.startswith("cuda"):
            return torch.float16
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype '{name}'; choose auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def quantize_int8(model):
    """Dynamic int8 quantization of every Linear (weights int8, activations quantized per call)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization announces its move to torchao
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def load_model(spec: str, home: Path, dtype: torch.dtype, device: str = "cpu"):
    """-> (model in eval mode, tokenizer or None). ``spec`` as accepted by ``store.resolve``."""
    from transformers import AutoModelForCausalLM

    path, gguf_file = store.resolve(spec, home)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa", **kwargs)
    except (OSError, ValueError) as exc:
        raise store.ModelNotFound(f"could not load model '{spec}' from {path}: {exc}") from exc
    return model.to(device).eval(), store.load_tokenizer(spec, home)


def eos_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    if ids is None and tokenizer is not None:
        ids = tokenizer.eos_token_id
    if ids is None:
        return []
    return [ids] if isinstance(ids, int) else list(ids)


def open_model(spec: str, home: Path, dtype: str = "auto", device: str = "cpu", model=None, tokenizer=None,
               n_ctx: int | None = None, **_ignored) -> "TorchLM":
    """Open ``spec`` with transformers; ``dtype`` auto / float32 / bfloat16 / float16 / int8 (dynamic
    quantization, CPU only). ``model`` wraps an already-built module instead (tests, the bench).
    ``n_ctx``: the most tokens one session holds (default: the model's own limit)."""
    if model is None:
        if dtype == "int8":
            if device != "cpu":
                raise ValueError("int8 models run on the CPU only; use float16 on CUDA")
            model, tokenizer = load_model(spec, home, torch.float32, device)
            model = quantize_int8(model)
        else:
            model, tokenizer = load_model(spec, home, resolve_dtype(dtype, device), device)
        fmt = dtype if dtype == "int8" else str(resolve_dtype(dtype, device)).removeprefix("torch.")
    else:
        model = model.to(device).eval()
        fmt = str(next(model.parameters()).dtype).removeprefix("torch.")
    return TorchLM(model, tokenizer, spec, fmt, n_ctx)


def _rows(head) -> int:
    """Output rows of an lm_head, plain or dynamically quantized (whose ``weight`` is a method)."""
    weight = head.weight() if callable(head.weight) else head.weight
    return weight.shape[0]


class TorchLM:
    """One transformers model; sessions share its weights and own their caches."""

    def __init__(self, model, tokenizer, name: str, weight_format: str, n_ctx: int | None = None):
        self.model, self.tokenizer = model, tokenizer
        cfg = model.config
        trained = getattr(cfg, "max_position_embeddings", 1 << 20)
        self.info = ModelInfo(
            name=name, engine="torch", path=str(getattr(cfg, "_name_or_path", name) or name), weight_format=weight_format,
            vocab=store.vocab_strings(tokenizer), vocab_size=_rows(model.get_output_embeddings()),
            hidden_size=cfg.hidden_size, eos=eos_ids(model, tokenizer),
            max_positions=min(n_ctx or trained, trained), batches=True,
        )

    def session(self, features: bool = False) -> "TorchSession":
        return TorchSession(self.model, features)

    def forward_batch(self, items: list) -> list:
        """Several sessions in one forward (``batch_forward``): their caches padded to the longest into
        one batch, each row attending to its own session's entries only. A forward of more than
        ``ALONE_ROWS`` tokens (a prompt, a draft's catch-up) runs alone, since the batch pads every
        session to the longest; so does each item when the batch fails (out of memory, say)."""
        results: list = [None] * len(items)
        together = []
        for i, (s, tokens, parents, logits_for) in enumerate(items):
            try:
                plan = s.plan(tokens, parents, logits_for)
            except ValueError as exc:
                results[i] = exc
                continue
            if len(tokens) > ALONE_ROWS:
                results[i] = s.run(plan)
            else:
                together.append((i, s, plan))
        if len(together) == 1:
            i, s, plan = together[0]
            results[i] = s.run(plan)
        elif together:
            try:
                outs = batch_forward(self.model, [(s.cache, plan) for _, s, plan in together])
            except Exception:  # the sessions' caches are as they were: each alone, its own error if any
                log.warning("a batched forward of %d sessions failed; running them one at a time", len(together),
                            exc_info=True)
                for i, s, plan in together:
                    results[i] = s.run(plan)
            else:
                for (i, s, plan), (logits, hidden) in zip(together, outs):
                    results[i] = s.commit(plan, logits, hidden)
        return results

    def close(self) -> None:
        pass


class TorchSession:
    """Committed tokens then pending nodes in one ``DynamicCache``."""

    def __init__(self, model, features: bool = False):
        self.model, self.features = model, features
        self.cache = DynamicCache(config=model.config)
        self.length = 0  # committed tokens (the first cache entries)
        self.pending: list[int] = []  # parent of each pending node (a pending index, -1 = committed)

    def forward(self, tokens: list[int], parents: list[int] | None = None, logits_for: int | None = None) -> Output:
        return self.run(self.plan(tokens, parents, logits_for))

    def plan(self, tokens: list[int], parents: list[int] | None, logits_for: int | None) -> lm.Plan:
        """Validate a forward and work out its positions; the cache is not touched."""
        return lm.plan_forward(self.pending, self.length, tokens, parents, logits_for)

    def run(self, plan: lm.Plan) -> Output:
        past = self.length + len(self.pending)
        try:
            logits, hidden = forward(self.model, self.cache, plan.tokens, plan.positions,
                                     None if plan.linear else seen_by(plan)[None, None], plan.rows)
        except Exception:
            crop_cache(self.cache, past)
            raise
        return self.commit(plan, logits, hidden)

    def commit(self, plan: lm.Plan, logits: torch.Tensor, hidden: torch.Tensor) -> Output:
        """The forward's entries are in the cache: its nodes become pending."""
        self.pending = plan.every
        return Output(logits.float(), hidden if self.features else None)

    def keep(self, path: list[int]) -> None:
        lm.check_path(path, self.pending)
        keep_cache_entries(self.cache, self.length, path)
        self.length += len(path)
        self.pending = []

    def truncate(self, length: int) -> None:
        self.length = min(self.length, length)
        self.pending = []
        crop_cache(self.cache, self.length)

    def close(self) -> None:
        self.cache = None


def seen_by(plan: lm.Plan) -> torch.Tensor:
    """[q, cached + q] bool: what each new node of ``plan`` sees (built only where needed: it walks
    every node's ancestors, quadratic in a long prompt)."""
    return tree.expansion_mask(list(range(plan.first, len(plan.every))), list(range(plan.first)), plan.every,
                               plan.committed)


def _mask_for(model, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if model.config._attn_implementation == "sdpa":
        return mask
    # eager and others take an additive float mask
    return torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)


@torch.inference_mode()
def forward(model, cache, tokens: list[int], positions: list[int], mask: torch.Tensor | None = None,
            logits_for: int | None = None):
    """One forward of ``tokens`` appended to ``cache``; ``mask`` [1, 1, q, past + q] bool or None
    (plain causal). Returns (logits [n, vocab], hidden [q, d]); hidden is the last layer's output
    after the final norm: the feature the draft head reads. Logits are computed for the last
    ``logits_for`` rows only (None: all q): a prefill needs one, feature extraction none, and the
    lm_head is ~15 % of a 1.5B model's work per row."""
    device = model.device
    ids = torch.tensor([tokens], dtype=torch.long, device=device)  # [1, q]
    pos = torch.tensor([positions], dtype=torch.long, device=device)  # [1, q]
    kwargs = {} if mask is None else {"attention_mask": _mask_for(model, mask, model.dtype).to(device)}
    out = model.get_decoder()(input_ids=ids, position_ids=pos, cache=cache, use_cache=True, **kwargs)
    hidden = out.last_hidden_state[0]  # [q, d]
    rows = hidden if logits_for is None else hidden[hidden.shape[0] - logits_for :]
    return model.get_output_embeddings()(rows), hidden


@torch.inference_mode()
def batch_forward(model, entries: list[tuple]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One forward of several sessions' new nodes, ``entries``: ``(cache, plan)``. The caches are copied
    into one batch, right-padded to the longest; the new nodes of every session sit after it, padded
    to the largest forward. Each row sees its own session's entries (its plan's mask) only; a padding
    row sees itself (an all-masked row would give NaN). Each session's new entries are then appended
    to its own cache. Returns per entry (logits of its last ``rows`` nodes, hidden [q, d])."""
    device = model.device
    past = [cache.get_seq_length() for cache, _ in entries]
    width, q_max = max(past), max(len(plan.tokens) for _, plan in entries)
    ids = torch.zeros(len(entries), q_max, dtype=torch.long)
    pos = torch.zeros(len(entries), q_max, dtype=torch.long)
    mask = torch.zeros(len(entries), 1, q_max, width + q_max, dtype=torch.bool)
    for b, ((_, plan), n) in enumerate(zip(entries, past)):
        q, seen = len(plan.tokens), seen_by(plan)
        ids[b, :q], pos[b, :q] = torch.tensor(plan.tokens), torch.tensor(plan.positions)
        mask[b, 0, :q, :n], mask[b, 0, :q, width : width + q] = seen[:, :n], seen[:, n:]
        mask[b, 0, range(q, q_max), range(width + q, width + q_max)] = True
    batch = DynamicCache(config=model.config)
    if width:
        for layer in range(len(batch.layers)):
            held = [cache.layers[layer] for cache, _ in entries]
            like = next(h for h, n in zip(held, past) if n)  # a fresh session's empty entries take its shape
            keys = [_pad(h.keys if n else like.keys[:, :, :0], width) for h, n in zip(held, past)]
            values = [_pad(h.values if n else like.values[:, :, :0], width) for h, n in zip(held, past)]
            batch.update(torch.cat(keys), torch.cat(values), layer)
    out = model.get_decoder()(input_ids=ids.to(device), position_ids=pos.to(device), cache=batch, use_cache=True,
                              attention_mask=_mask_for(model, mask, model.dtype).to(device))
    results = []
    for b, (_, plan) in enumerate(entries):  # everything that can fail before any session's cache changes
        q = len(plan.tokens)
        hidden = out.last_hidden_state[b, :q]
        results.append((model.get_output_embeddings()(hidden[q - plan.rows :]), hidden))
    try:
        for b, ((cache, plan), n) in enumerate(zip(entries, past)):
            q = len(plan.tokens)
            for layer, entry in enumerate(batch.layers):
                cache.update(entry.keys[b : b + 1, :, width : width + q], entry.values[b : b + 1, :, width : width + q], layer)
    except Exception:
        for (cache, _), n in zip(entries, past):
            crop_cache(cache, n)
        raise
    return results


def _pad(entries: torch.Tensor, width: int) -> torch.Tensor:
    """[1, heads, n, dim] -> [1, heads, width, dim], zeros after the n entries."""
    return torch.nn.functional.pad(entries, (0, 0, 0, width - entries.shape[-2]))


def keep_cache_entries(cache, past_len: int, keep: list[int]) -> None:
    """Compact the cache to ``past_len`` entries + the pending entries in ``keep`` (relative indices)."""
    total = cache.get_seq_length()
    if keep == list(range(len(keep))):  # a prefix of the block: a crop does it
        if total - past_len - len(keep) > 0:
            cache.crop(-(total - past_len - len(keep)))
        return
    index = torch.tensor(list(range(past_len)) + [past_len + k for k in keep], dtype=torch.long)
    for layer in cache.layers:
        layer.keys = layer.keys.index_select(-2, index.to(layer.keys.device))
        layer.values = layer.values.index_select(-2, index.to(layer.values.device))


def crop_cache(cache, length: int) -> None:
    """Drop every cache entry past ``length``, layer by layer (after a failed update the layers may
    hold different counts)."""
    for layer in cache.layers:
        if layer.keys is not None and layer.keys.shape[-2] > length:
            layer.keys, layer.values = layer.keys[..., :length, :], layer.values[..., :length, :]
