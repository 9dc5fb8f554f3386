"""Tiny seeded models built from config, their folders, and a verifier process to talk to."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models as tk_models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(vocab_size: int = 99) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=2, intermediate_size=37, max_position_embeddings=512,
                       eos_token_id=None, bos_token_id=None, pad_token_id=0)


def tiny_target(seed: int = 0, vocab_size: int = 99, sharpen: float = 1.0) -> LlamaForCausalLM:
    """A random Llama; ``sharpen`` scales the output head so distributions are peaked."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(vocab_size)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpen)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def noisy_copy(model: LlamaForCausalLM, noise: float, seed: int = 1) -> LlamaForCausalLM:
    """A draft that agrees with the target often but not always."""
    draft = LlamaForCausalLM(model.config).eval()
    draft.load_state_dict(model.state_dict())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(noise * torch.randn(p.shape, generator=gen) * p.std())
    return draft


def tiny_tokenizer(vocab_size: int = 99, prefix: str = "w") -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, **{f"{prefix}{i}": i for i in range(1, vocab_size)}}
    tok = Tokenizer(tk_models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<unk>")


def save_model(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


class VerifierProcess:
    """`dovetail verifier` in a child process on tcp://127.0.0.1 with a free port."""

    def __init__(self, model_dir: Path, *extra: str, dtype: str = "float32"):
        read_fd, write_fd = os.pipe()
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dovetail_rt.cli", "verifier", "-m", str(model_dir), "--dtype", dtype,
             "--listen", "tcp://127.0.0.1:0", "--ready-fd", str(write_fd), "-t", "1", *extra],
            pass_fds=(write_fd,), env=env, stdin=subprocess.DEVNULL,
        )
        os.close(write_fd)
        with os.fdopen(read_fd) as ready:
            self.endpoint = ready.readline().strip()
        if not self.endpoint:
            raise RuntimeError(f"verifier exited with {self.proc.wait()} before it was ready")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """Folder of the tiny target (vocab 99, peaked distributions) with its tokenizer."""
    return save_model(tiny_target(0, sharpen=30), tiny_tokenizer(), tmp_path_factory.mktemp("tiny_target"))


@pytest.fixture(scope="session")
def verifier(tiny_dir):
    v = VerifierProcess(tiny_dir)
    yield v
    v.stop()
