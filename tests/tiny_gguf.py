"""Write a tiny transformers Llama to a float32 GGUF file that llama.cpp loads as it is."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGUFWriter, LlamaFileType, TokenType
from transformers import LlamaForCausalLM


def _rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """q/k weight rows from the HF rotary layout (halves) to llama.cpp's (interleaved pairs), per head."""
    rows, cols = w.shape
    return w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def write_gguf(model: LlamaForCausalLM, vocab: list[str], path, eos: int | None = None) -> Path:
    """Write ``model`` (float32) with ``vocab`` (token strings in id order) to the GGUF file ``path``.

    No BOS or separator is added, id 0 is the unknown token, and ``eos`` is the only end-of-generation
    token when given (with None, llama.cpp sees none). The vocabulary is a WordPiece ("bert") one
    because llama.cpp gives a "llama" one EOS id 2 whatever the file says. Feed llama.cpp token ids:
    it reads every word of a text as id 0, and tokenizing with ``add_special`` aborts the process (no
    BOS). llama.cpp warns at load that BERT's default special ids (100..103) are out of range."""
    cfg = model.config
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    rope = getattr(cfg, "rope_parameters", None) or {"rope_theta": getattr(cfg, "rope_theta", 10000.0)}
    if len(vocab) != cfg.vocab_size:
        raise ValueError(f"{len(vocab)} token strings for a vocabulary of {cfg.vocab_size}")

    path = Path(path)
    w = GGUFWriter(path, "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_rope_dimension_count(head_dim)
    w.add_file_type(LlamaFileType.ALL_F32)
    w.add_vocab_size(cfg.vocab_size)

    w.add_tokenizer_model("bert")
    w.add_token_list(vocab)
    w.add_token_scores([0.0] * len(vocab))
    w.add_token_types([TokenType.UNKNOWN] + [TokenType.NORMAL] * (len(vocab) - 1))
    w.add_unk_token_id(0)
    w.add_add_bos_token(False)
    w.add_add_sep_token(False)
    w.add_add_eos_token(False)
    if eos is not None:
        w.add_eos_token_id(eos)

    sd = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    for i in range(cfg.num_hidden_layers):
        hf, gg = f"model.layers.{i}.", f"blk.{i}."
        w.add_tensor(gg + "attn_norm.weight", sd[hf + "input_layernorm.weight"])
        w.add_tensor(gg + "attn_q.weight", _rope_rows(sd[hf + "self_attn.q_proj.weight"], n_head))
        w.add_tensor(gg + "attn_k.weight", _rope_rows(sd[hf + "self_attn.k_proj.weight"], n_kv))
        w.add_tensor(gg + "attn_v.weight", sd[hf + "self_attn.v_proj.weight"])
        w.add_tensor(gg + "attn_output.weight", sd[hf + "self_attn.o_proj.weight"])
        w.add_tensor(gg + "ffn_norm.weight", sd[hf + "post_attention_layernorm.weight"])
        w.add_tensor(gg + "ffn_gate.weight", sd[hf + "mlp.gate_proj.weight"])
        w.add_tensor(gg + "ffn_up.weight", sd[hf + "mlp.up_proj.weight"])
        w.add_tensor(gg + "ffn_down.weight", sd[hf + "mlp.down_proj.weight"])

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
