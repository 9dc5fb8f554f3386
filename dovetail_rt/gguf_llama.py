"""Write a float32 Llama GGUF file that llama.cpp loads as it is, with the `gguf` package: the one
writer behind the kernel probe's random model (``kernels.write_probe_model``) and the tests' tiny
models converted from transformers (tests/tiny_gguf.py).

The vocabulary is a WordPiece ("bert") one: llama.cpp gives a "llama" one EOS id 2 whatever the file
says. No BOS or separator is added, id 0 is the unknown token, and ``eos`` is the only
end-of-generation token when given (with None, llama.cpp sees none). Feed llama.cpp token ids: it
reads every word of a text as id 0. llama.cpp warns at load that BERT's default special ids
(100..103) are out of range.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

BLOCK_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")


@dataclass(frozen=True)
class LlamaShape:
    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    context: int = 256
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def write(path, shape: LlamaShape, vocab: list[str], tensors: dict[str, np.ndarray], eos: int | None = None) -> Path:
    """``tensors``: float32 arrays named as llama.cpp names them (``token_embd``, ``output_norm``,
    ``output``, and ``blk.{i}.{BLOCK_TENSORS}``, without ".weight"); q and k rows already in
    llama.cpp's rotary layout (interleaved pairs per head)."""
    from gguf import GGUFWriter, LlamaFileType, TokenType

    expected = {"token_embd", "output_norm", "output"} | {f"blk.{i}.{t}" for i in range(shape.layers) for t in BLOCK_TENSORS}
    if set(tensors) != expected:
        raise ValueError(f"tensors missing {sorted(expected - set(tensors))[:4]}, unknown {sorted(set(tensors) - expected)[:4]}")
    path = Path(path)
    w = GGUFWriter(str(path), "llama")
    w.add_context_length(shape.context)
    w.add_embedding_length(shape.hidden)
    w.add_feed_forward_length(shape.ffn)
    w.add_block_count(shape.layers)
    w.add_head_count(shape.heads)
    w.add_head_count_kv(shape.kv_heads)
    w.add_layer_norm_rms_eps(shape.rms_eps)
    w.add_rope_freq_base(shape.rope_theta)
    w.add_rope_dimension_count(shape.head_dim)
    w.add_file_type(LlamaFileType.ALL_F32)
    w.add_vocab_size(len(vocab))
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
    for name in ["token_embd", "output_norm", "output"] + [f"blk.{i}.{t}" for i in range(shape.layers) for t in BLOCK_TENSORS]:
        w.add_tensor(name + ".weight", np.ascontiguousarray(tensors[name], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
