"""Write a tiny transformers Llama to a float32 GGUF file that llama.cpp loads as it is."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from transformers import LlamaForCausalLM

from dovetail_rt.gguf_llama import LlamaShape, write


def _rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """q/k weight rows from the HF rotary layout (halves) to llama.cpp's (interleaved pairs), per head."""
    rows, cols = w.shape
    return w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def write_gguf(model: LlamaForCausalLM, vocab: list[str], path, eos: int | None = None) -> Path:
    """Write ``model`` (float32) with ``vocab`` (token strings in id order) to the GGUF file ``path``
    (``dovetail_rt.gguf_llama.write``: what llama.cpp makes of its vocabulary and special ids)."""
    cfg = model.config
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    rope = getattr(cfg, "rope_parameters", None) or {"rope_theta": getattr(cfg, "rope_theta", 10000.0)}
    if len(vocab) != cfg.vocab_size:
        raise ValueError(f"{len(vocab)} token strings for a vocabulary of {cfg.vocab_size}")
    shape = LlamaShape(hidden=cfg.hidden_size, ffn=cfg.intermediate_size, layers=cfg.num_hidden_layers, heads=n_head,
                       kv_heads=n_kv, context=cfg.max_position_embeddings, rms_eps=cfg.rms_norm_eps,
                       rope_theta=rope["rope_theta"])
    sd = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    tensors = {"token_embd": sd["model.embed_tokens.weight"], "output_norm": sd["model.norm.weight"],
               "output": sd["lm_head.weight"]}
    for i in range(cfg.num_hidden_layers):
        hf, gg = f"model.layers.{i}.", f"blk.{i}."
        tensors.update({
            gg + "attn_norm": sd[hf + "input_layernorm.weight"],
            gg + "attn_q": _rope_rows(sd[hf + "self_attn.q_proj.weight"], n_head),
            gg + "attn_k": _rope_rows(sd[hf + "self_attn.k_proj.weight"], n_kv),
            gg + "attn_v": sd[hf + "self_attn.v_proj.weight"],
            gg + "attn_output": sd[hf + "self_attn.o_proj.weight"],
            gg + "ffn_norm": sd[hf + "post_attention_layernorm.weight"],
            gg + "ffn_gate": sd[hf + "mlp.gate_proj.weight"],
            gg + "ffn_up": sd[hf + "mlp.up_proj.weight"],
            gg + "ffn_down": sd[hf + "mlp.down_proj.weight"],
        })
    return write(path, shape, vocab, tensors, eos)
