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


@pytest.mark.timeout(600)
def test_a_two_turn_function_call_through_the_server(installed):
    """The official client, `dovetail serve` on the real Q4_K_M target: tool_choice required gives a
    call of the tool with arguments that parse (whole and streamed), the tool's answer goes back as a
    `tool` message (with the assistant's call before it), and the model answers in text with it."""
    import json

    import openai

    from test_server import Server

    weather = {"type": "function", "function": {"name": "get_weather", "description": "The current weather in a city",
                                                "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                               "required": ["city"]}}}
    server = Server(store.DEFAULT_TARGET, "-md", "ngram", "-c", "2048", "-t", "2")
    try:
        server.wait_ready(timeout=300)
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        msgs = [{"role": "user", "content": "What is the weather in Paris right now?"}]
        first = client.chat.completions.create(model="m", messages=msgs, tools=[weather], tool_choice="required",
                                               temperature=0, max_tokens=60)
        choice = first.choices[0]
        assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
        call = choice.message.tool_calls[0]
        assert call.function.name == "get_weather" and isinstance(json.loads(call.function.arguments)["city"], str)
        chunks = list(client.chat.completions.create(model="m", messages=msgs, tools=[weather], tool_choice="required",
                                                     temperature=0, max_tokens=60, stream=True))
        streamed = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
        assert [d.function.name for d in streamed] == ["get_weather"]
        assert streamed[0].function.arguments == call.function.arguments
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
        msgs += [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                 {"role": "tool", "tool_call_id": call.id, "content": "18 degrees Celsius, sunny"}]
        # tool_choice none: the tools stay out of the prompt (the 1.5B, shown them again, writes another call)
        second = client.chat.completions.create(model="m", messages=msgs, tools=[weather], tool_choice="none",
                                                temperature=0, max_tokens=40)
        assert second.choices[0].message.content and not second.choices[0].message.tool_calls
        assert "18" in second.choices[0].message.content
        chunks = list(client.chat.completions.create(model="m", messages=msgs, tools=[weather], tool_choice="none",
                                                     temperature=0, max_tokens=40, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == second.choices[0].message.content
    finally:
        server.stop()
