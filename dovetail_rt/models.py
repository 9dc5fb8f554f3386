"""Load causal LMs (installed defaults, folders, GGUF files, hub ids) and run tree-shaped forwards.

KV cache bookkeeping lives here too: a forward over a token tree appends every node to the
cache; ``keep_cache_entries`` then compacts the cache to the accepted path. No sockets here.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from . import store

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def load_draft(spec: str, home: Path, dtype_name: str, device: str):
    """-> (draft, tokenizer or None): a Dovetail head folder (detected by its config) or a small LM.

    ``dtype_name`` auto = float16 on CUDA; on the CPU int8 (dynamic quantization) for an LM and
    bfloat16 for a head where the CPU has BF16 instructions, else float32. Draft precision never
    changes the output (verification is lossless); it moves the acceptance rate a little and the
    draft time a lot. On the 2-core dev CPU one 0.5B draft token took 148 / 75 / 41 ms in float32 /
    bfloat16 / int8, and a 1-layer head's tree step for the 1.5B target 284 / 73 ms in float32 / bfloat16.
    """
    from . import draft_head

    path = Path(spec).expanduser()
    if path.is_dir() and draft_head.is_head_folder(path):
        name = dtype_name
        if dtype_name in ("auto", "int8") and device == "cpu":
            name = "bfloat16" if cpu_has_bf16() else "float32"
        head = draft_head.load_head(path, home, resolve_dtype(name, device), device)
        from transformers import AutoTokenizer

        return head, AutoTokenizer.from_pretrained(store.resolve(head.config.target, home)[0])
    if dtype_name == "auto":
        dtype_name = "float16" if device.startswith("cuda") else "int8"
    if dtype_name == "int8":
        if device != "cpu":
            raise ValueError("int8 drafts run on the CPU only; use float16 on CUDA")
        model, tokenizer = load_model(spec, home, torch.float32, device)
        return quantize_int8(model), tokenizer
    return load_model(spec, home, resolve_dtype(dtype_name, device), device)


def quantize_int8(model):
    """Dynamic int8 quantization of every Linear (weights int8, activations quantized per call)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization announces its move to torchao
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def load_model(spec: str, home: Path, dtype: torch.dtype, device: str = "cpu"):
    """-> (model in eval mode, tokenizer or None). ``spec`` as accepted by ``store.resolve``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, gguf_file = store.resolve(spec, home)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa", **kwargs)
    except (OSError, ValueError) as exc:
        raise store.ModelNotFound(f"could not load model '{spec}' from {path}: {exc}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError, TypeError):
        log.warning("no tokenizer found with model '%s': token ids only", spec)
        tokenizer = None
    return model.to(device).eval(), tokenizer


def vocab_strings(tokenizer) -> list[str]:
    """The tokenizer's vocabulary as strings in id order (the handshake compares these)."""
    if tokenizer is None:
        return []
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    return [by_id.get(i, "") for i in range(max(by_id) + 1)] if by_id else []


def eos_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    if ids is None and tokenizer is not None:
        ids = tokenizer.eos_token_id
    if ids is None:
        return []
    return [ids] if isinstance(ids, int) else list(ids)


def is_chain(parents: list[int]) -> bool:
    return all(p == i - 1 for i, p in enumerate(parents))


def tree_positions(parents: list[int], past_len: int) -> list[int]:
    """Position of each node = past_len + its depth (the root, parents[0] = -1, has depth 0)."""
    depth = []
    for p in parents:
        depth.append(0 if p < 0 else depth[p] + 1)
    return [past_len + d for d in depth]


def tree_attention_mask(parents: list[int], past_len: int) -> torch.Tensor:
    """[1, 1, q, past_len + q] bool: every node sees the whole cache, its ancestors and itself."""
    q = len(parents)
    mask = torch.zeros(q, past_len + q, dtype=torch.bool)
    mask[:, :past_len] = True
    for i, p in enumerate(parents):
        if p >= 0:
            mask[i, past_len : past_len + q] = mask[p, past_len : past_len + q]
        mask[i, past_len + i] = True
    return mask[None, None]


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


def forward_tree(model, cache, tokens: list[int], parents: list[int], past_len: int, logits_for: int | None = None):
    """Forward over a token tree (parents[0] = -1) appended after ``past_len`` cached tokens.
    A chain takes the plain causal path."""
    mask = None if is_chain(parents) else tree_attention_mask(parents, past_len)
    return forward(model, cache, tokens, tree_positions(parents, past_len), mask, logits_for)


def keep_cache_entries(cache, past_len: int, keep: list[int]) -> None:
    """Compact the cache to ``past_len`` entries + the tree nodes in ``keep`` (relative indices)."""
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
    """Drop every cache entry past ``length``."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)
