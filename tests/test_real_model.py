"""The default real pair (Qwen2.5-Coder 1.5B target, 0.5B draft) over a real socket: on the torch
engine in float32 against transformers' greedy output, and on the llama.cpp engine (the installed
Q4_K_M GGUF, the default) against llama.cpp's own one-token-at-a-time greedy decode of that file."""

import pytest
import torch

from dovetail_rt import Client, data, store
from dovetail_rt.config import DraftConfig, dovetail_home

from conftest import VerifierProcess, engine_greedy

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def installed():
    home = dovetail_home()
    for name in (store.DEFAULT_TARGET, store.DEFAULT_DRAFT):
        if not store.is_installed(home, name):
            pytest.fail(f"{name} is not installed in {home}: run `dovetail models install` first")
    return home


@pytest.mark.timeout(900)
@pytest.mark.parametrize("draft_config", [DraftConfig(), DraftConfig(tree_top_k=2, tree_depth=4, tree_tokens=8)],
                         ids=["chain", "tree"])
def test_default_pair_greedy_equals_target(installed, draft_config):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target_dir = store.model_dir(installed, store.DEFAULT_TARGET)
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    prompt = tokenizer(data.humaneval()[0].text, add_special_tokens=False)["input_ids"]
    verifier = VerifierProcess(target_dir, "--engine", "torch", dtype="float32")
    try:
        with Client(verifier=verifier.endpoint, draft=store.DEFAULT_DRAFT, draft_config=draft_config,
                    timeout_s=300, home=installed, engine="torch") as client:
            out = client.generate(prompt, max_new_tokens=32)
    finally:
        verifier.stop()
    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    expected = target.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)[0, len(prompt):].tolist()
    assert out.token_ids == expected
    assert out.stats.n_accepted > 0


@pytest.mark.timeout(600)
@pytest.mark.parametrize("draft_config", [DraftConfig(), DraftConfig(tree_top_k=2, tree_depth=4, tree_tokens=8)],
                         ids=["chain", "tree"])
def test_default_pair_on_llamacpp_equals_its_one_token_decode(installed, draft_config):
    pytest.importorskip("llama_cpp")
    from dovetail_rt import lm

    tokenizer = store.load_tokenizer(store.DEFAULT_TARGET, installed)
    prompt = tokenizer(data.humaneval()[0].text, add_special_tokens=False)["input_ids"]
    verifier = VerifierProcess(store.DEFAULT_TARGET, "--engine", "llamacpp", "--ctx-size", "1024")
    try:
        assert verifier.target["engine"] == "llamacpp" and verifier.target["format"] == "Q4_K_M"
        with Client(verifier=verifier.endpoint, draft=store.DEFAULT_DRAFT, draft_config=draft_config,
                    timeout_s=300, home=installed) as client:
            assert client.target.engine == "llamacpp"
            out = client.generate(prompt, max_new_tokens=32)
    finally:
        verifier.stop()
    target = lm.open_lm(store.DEFAULT_TARGET, installed, "llamacpp", threads=2, n_ctx=1024)
    expected = engine_greedy(target, prompt, 32)
    assert out.stats.n_accepted > 0
    if out.token_ids != expected:  # allowed only where the one-token decode's top two logits nearly tie
        at = next(i for i, (a, b) in enumerate(zip(out.token_ids, expected)) if a != b)
        from dovetail_rt.bench.harness import reference_logits

        top = reference_logits(target, prompt, expected[:at]).topk(2).values.tolist()
        # Q4_K_M logits move by up to ~0.4 between batch sizes here (DESIGN.md section 7)
        assert top[0] - top[1] < 0.8, f"diverged at {at} where the target was sure (gap {top[0] - top[1]:.3f})"
    target.close()
