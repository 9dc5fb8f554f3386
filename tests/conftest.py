"""Tiny seeded models built from config, their folders, and a verifier process to talk to."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models as tk_models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from dovetail_rt.config import CHILD_ENDPOINT, LinkConfig
from dovetail_rt.launcher import VerifierChild

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


class VerifierProcess(VerifierChild):
    """`dovetail verifier` on a tiny model in a child process (one thread), float32 by default; ``extra``
    are `dovetail verifier` options, read by the CLI's own parser into the configs that cross."""

    def __init__(self, model_dir: Path, *extra: str, dtype: str = "float32", log_file: Path | None = None):
        from dovetail_rt import cli

        args = cli.build_parser().parse_args(["verifier", "-m", str(model_dir), "--dtype", dtype, "-t", "1",
                                              "--listen", CHILD_ENDPOINT, *extra])
        super().__init__(cli.verifier_config(args, LinkConfig(endpoint=args.listen, curve_secret_key=args.curve_secret_key,
                                                              authorized_keys=args.authorized_keys,
                                                              insecure=args.insecure)),
                         cli.placement_config(args), log_file=log_file, verbose=getattr(args, "verbose", False),
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """Folder of the tiny target (vocab 99, peaked distributions) with its tokenizer."""
    return save_model(tiny_target(0, sharpen=30), tiny_tokenizer(), tmp_path_factory.mktemp("tiny_target"))


@pytest.fixture(scope="session")
def verifier(tiny_dir):
    v = VerifierProcess(tiny_dir)
    yield v
    v.stop()


def engine_greedy(model, prompt: list[int], n: int) -> list[int]:
    """An opened ``lm.LM``'s own greedy decode, one token per forward: on llama.cpp, what llama.cpp's
    own loop does with the same file (the reference every speculative output must equal)."""
    s = model.session()
    logits = s.forward(prompt, logits_for=1).logits[-1]
    s.keep(list(range(len(prompt))))
    out = []
    while len(out) < n:
        out.append(int(logits.argmax()))
        logits = s.forward(out[-1:]).logits[-1]
        s.keep([0])
    s.close()
    return out


def constrained_greedy(model, prompt: list[int], n: int, grammar_text: str) -> list[int]:
    """The constrained one-token decode of an opened ``lm.LM`` with the tiny vocabulary: each step's
    logits masked by the grammar, then argmax (what structured output must equal)."""
    from dovetail_rt import grammar

    vocab = [t for t, _ in sorted(tiny_tokenizer().get_vocab().items(), key=lambda kv: kv[1])]
    c = grammar.Grammars(vocab, model.info.vocab_size, model.info.eos).constraint(grammar_text)
    s = model.session()
    logits = s.forward(prompt, logits_for=1).logits[-1]
    s.keep(list(range(len(prompt))))
    out = []
    while len(out) < n:
        out.append(int(c.masked(logits).argmax()))
        c.consume(out[-1])
        logits = s.forward(out[-1:]).logits[-1]
        s.keep([0])
    s.close()
    return out
