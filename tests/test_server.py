"""`dovetail serve` as a real process on 127.0.0.1, driven by the official `openai` client and raw HTTP:
endpoints, error codes, SSE framing, usage and timings, /health while loading, metrics, the queue
bound, cancel on disconnect, and outputs equal to the target's own greedy decode."""

from __future__ import annotations

import json
import re
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai")

from dovetail_rt import lm  # noqa: E402

from conftest import (ROOT, constrained_greedy, engine_greedy, noisy_copy, save_model, tiny_target,  # noqa: E402
                      tiny_tokenizer)

KEY = "test-key"
CTX = 320  # the served context (-c): the tiny model itself holds 512
TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}w1"  # a tiny chat template: the turns, then w1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model_dir: Path, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dovetail_rt.cli", "serve", "-m", str(model_dir), "--port", str(self.port),
             "-t", "1", "--dtype", "float32", *extra], env=env, stdin=subprocess.DEVNULL)
        self.health = []  # every /health status seen while starting

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dovetail serve exited with {self.proc.returncode}")
            try:
                status, body = get(self.url + "/health")
                self.health.append((status, body))
                if status == 200:
                    return
            except OSError:
                pass  # not listening yet
            time.sleep(0.05)
        raise TimeoutError("dovetail serve never became ready")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def get(url: str, key: str | None = None) -> tuple[int, dict | str]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            body = r.read().decode()
            return r.status, json.loads(body) if "json" in r.headers.get("content-type", "") else body
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read().decode())


def post(url: str, body: dict, key: str | None = KEY) -> tuple[int, dict, dict]:
    req = urllib.request.Request(url, json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read().decode())


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    tok = tiny_tokenizer()
    tok.chat_template = TEMPLATE
    return save_model(tiny_target(0, sharpen=30), tok, tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="module")
def server(model_dir):
    s = Server(model_dir, "-md", "ngram", "--parallel", "2", "--queue", "1", "--api-key", KEY, "--engine", "torch",
               "-c", str(CTX), "--alias", "my-alias")
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def target(model_dir):
    return lm.open_lm(str(model_dir), Path("."), "torch", dtype="float32")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def expected_text(target, prompt_ids: list[int], n: int) -> tuple[str, list[int]]:
    ids = engine_greedy(target, prompt_ids, n)
    return tiny_tokenizer().decode(ids, skip_special_tokens=True), ids


def chat_ids(text: str) -> list[int]:
    tok = tiny_tokenizer()
    return tok(text + " w1", add_special_tokens=False)["input_ids"]  # what TEMPLATE makes of one user turn


@pytest.mark.timeout(180)
def test_health_is_503_with_an_error_body_while_loading(server):
    loading = [body for status, body in server.health if status == 503]
    assert loading, f"/health was never seen loading: {server.health[:3]}"
    assert loading[0]["error"]["type"] == "unavailable_error" and "load" in loading[0]["error"]["message"]
    assert get(server.url + "/health") == (200, {"status": "ok", "verifier": {"restarts": 0, "last_death": None}})


@pytest.mark.timeout(120)
def test_chat_completion_equals_the_target_greedy_output(client, target):
    text = "w5 w7 w9 w11 w5 w7 w9 w11 w5 w7"
    out = client.chat.completions.create(model=client.models.list().data[0].id, temperature=0, max_tokens=24,
                                         messages=[{"role": "user", "content": text}])
    want, ids = expected_text(target, chat_ids(text), 24)
    assert out.choices[0].message.content == want and out.choices[0].message.role == "assistant"
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 24 and out.usage.prompt_tokens == len(chat_ids(text))
    timings = out.model_extra["timings"]
    assert timings["predicted_n"] == 24 and timings["prompt_n"] + timings["cache_n"] == out.usage.prompt_tokens
    assert timings["cache_n"] == out.usage.prompt_tokens_details.cached_tokens
    assert {"prompt_ms", "predicted_ms", "predicted_per_second", "draft_n", "draft_n_accepted", "tau"} <= set(timings)


@pytest.mark.timeout(120)
def test_streamed_chat_has_the_role_first_then_text_finish_usage(client, target):
    text = "w3 w4 w5 w3 w4 w5 w3 w4"
    chunks = list(client.chat.completions.create(
        model=client.models.list().data[0].id, temperature=0,
        max_tokens=20, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": text}]))
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == expected_text(target, chat_ids(text), 20)[0]


@pytest.mark.timeout(120)
def test_sse_framing_ends_with_done(server):
    status, headers, body = post(server.url + "/v1/completions", {"prompt": "w8 w9 w10", "max_tokens": 5, "stream": True,
                                                                  "temperature": 0})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = body.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for event in events[:-2]:
        assert event.startswith("data: ") and json.loads(event[6:])["object"] == "text_completion"


@pytest.mark.timeout(120)
def test_completion_stops_at_a_stop_string_that_never_reaches_the_client(client, target):
    tok = tiny_tokenizer()
    prompt = "w5 w7 w9 w11"
    full, _ = expected_text(target, tok(prompt, add_special_tokens=False)["input_ids"], 30)
    stop = " ".join(full.split()[3:5])  # the 4th and 5th words: a stop string across two tokens
    for stream in (False, True):
        if stream:
            text = "".join(c.choices[0].text for c in client.completions.create(
                model=client.models.list().data[0].id, prompt=prompt, max_tokens=30, temperature=0, stop=[stop],
                stream=True))
        else:
            out = client.completions.create(model=client.models.list().data[0].id, prompt=prompt, max_tokens=30,
                                            temperature=0, stop=stop)
            text = out.choices[0].text
            assert out.choices[0].finish_reason == "stop"
        assert text == full[: full.index(stop)], f"stream={stream}"


@pytest.mark.timeout(120)
def test_grammar_constrains_the_output_losslessly(client, target):
    """llama.cpp's `grammar` (GBNF) through the official client: the text is the target's own
    constrained greedy decode, streamed and not."""
    from dovetail_rt import grammar

    gbnf = 'root ::= ("w1" ("w2" | "w3" | "w4") ("w5" | "w6" | "w7"))+'
    msgs = [{"role": "user", "content": "w5 w7 w9 w11"}]
    ids = constrained_greedy(target, chat_ids("w5 w7 w9 w11"), 9, grammar.compile_grammar("gbnf", gbnf))
    want = tiny_tokenizer().decode(ids)
    assert ids[0] == 1 and ids[1] in (2, 3, 4) and ids[2] in (5, 6, 7)
    out = client.chat.completions.create(model="m", messages=msgs, max_tokens=9, temperature=0, extra_body={"grammar": gbnf})
    assert out.choices[0].message.content == want
    chunks = client.chat.completions.create(model="m", messages=msgs, max_tokens=9, temperature=0, stream=True,
                                            extra_body={"grammar": gbnf})
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want


@pytest.mark.timeout(60)
def test_tools_and_tool_messages_are_taken(client, target):
    """With tools (tool_choice auto) the request is answered: the tiny model writes no call, so its
    text comes back as content with finish_reason stop/length; a tool message is taken back."""
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    msgs = [{"role": "user", "content": "w5 w7"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
                                                                   "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "w9"}]
    for stream in (False, True):
        out = client.chat.completions.create(model="m", messages=msgs, tools=[tool], max_tokens=6, temperature=0,
                                             stream=stream)
        if stream:
            chunks = list(out)
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        else:
            text, finish = out.choices[0].message.content, [out.choices[0].finish_reason]
            assert out.choices[0].message.tool_calls is None
        assert text and finish == ["length"], stream


@pytest.mark.timeout(60)
def test_errors_are_openai_error_objects(server, client):
    url = server.url + "/v1/chat/completions"
    msgs = [{"role": "user", "content": "w2"}]
    status, _, body = post(url, {"messages": msgs, "n": 2})
    assert status == 400 and body["error"]["param"] == "n" and "n = 1" in body["error"]["message"]
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    status, _, body = post(server.url + "/v1/completions", {"prompt": "w5", "tools": [tool]})  # a chat feature
    assert status == 400 and body["error"]["param"] == "tools" and "chat" in body["error"]["message"]
    status, _, body = post(url, {"messages": msgs, "tools": [tool], "tool_choice": {"type": "function",
                                                                                    "function": {"name": "g"}}})
    assert status == 400 and "not among the tools" in body["error"]["message"]
    status, _, body = post(url, {"messages": msgs, "response_format": {"type": "json_object"}})  # no word spells "{"
    assert status == 400 and body["error"]["param"] == "response_format" and "vocabulary" in body["error"]["message"]
    status, _, body = post(url, {"messages": msgs, "response_format": {"type": "xml"}})
    assert status == 400 and body["error"]["param"] == "response_format" and "xml" in body["error"]["message"]
    status, _, body = post(url, {"messages": msgs, "grammar": "root ::= ("})  # llama.cpp's GBNF, broken
    assert status == 400 and body["error"]["param"] == "grammar"
    status, _, body = post(url, {"messages": msgs, "grammar": 'root ::= "w"', "json_schema": {"type": "object"}})
    assert status == 400 and "one of" in body["error"]["message"]
    status, _, body = post(url, {"messages": msgs}, key="wrong")
    assert status == 401 and body["error"]["type"] == "authentication_error"
    status, _, body = post(url, {"messages": []})
    assert status == 400 and body["error"]["param"] == "messages"
    status, _, body = post(server.url + "/v1/completions", {"prompt": [5, 99]})  # the tiny vocabulary has 99 ids
    assert status == 400 and body["error"]["param"] == "prompt" and "0..98" in body["error"]["message"]
    status, _, body = post(url, {"messages": msgs, "top_k": 99})
    assert status == 400 and body["error"]["param"] == "top_k"
    status, _, body = post(url, {"messages": msgs, "presence_penalty": 0.5})
    assert status == 400 and body["error"]["param"] == "presence_penalty" and "penalties" in body["error"]["message"]
    status, _, body = post(server.url + "/v1/completions", {"prompt": "w5", "echo": True})
    assert status == 400 and body["error"]["param"] == "echo"
    for field, value in (("presence_penalty", 0.5), ("frequency_penalty", 1.0)):  # refused by
        status, _, body = post(server.url + "/v1/completions", {"prompt": "w5", field: value})  # completions too
        assert status == 400 and body["error"]["param"] == field, (field, status, body)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=client.models.list().data[0].id, messages=msgs, top_p=0)


@pytest.mark.timeout(120)
def test_what_llama_cpp_and_vllm_clients_send_is_answered(server, client, target):
    """Any model name, fields we do not use, routes without /v1, CORS, and the response fields clients read."""
    text = "w5 w7 w9 w11 w5 w7"
    want, _ = expected_text(target, chat_ids(text), 8)
    msgs = [{"role": "user", "content": text}]
    for name in ("gpt-3.5-turbo-instruct", "davinci-002", "my-alias"):  # one target answers every name
        out = client.chat.completions.create(model=name, messages=msgs, max_tokens=8, temperature=0)
        assert out.choices[0].message.content == want, name
    assert out.system_fingerprint.startswith("fp_")
    # the same chat again: the verifier's prefix cache held all of it but the last token (which runs), and the
    # answer is the target's greedy one all the same
    assert out.usage.prompt_tokens_details.cached_tokens == len(chat_ids(text)) - 1
    extras = {"timings_per_token": True, "return_tokens": True, "id_slot": 0, "cache_prompt": True,
              "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    status, _, body = post(server.url + "/v1/chat/completions", {"messages": msgs, "max_tokens": 8, "temperature": 0,
                                                                 "stream": True, **extras})
    assert status == 200 and "[DONE]" in body
    status, _, body = post(server.url + "/v1/completions", {"prompt": "w5 w7 w9", "n_predict": 6, "temperature": 0,
                                                            "timings_per_token": True})
    assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == 6  # llama.cpp's n_predict
    root = openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0)  # posts to /chat/completions
    assert root.chat.completions.create(model="x", messages=msgs, max_tokens=8, temperature=0).choices[0].message.content == want
    assert root.completions.create(model="x", prompt="w5 w7 w9", max_tokens=3, temperature=0).usage.completion_tokens == 3
    status, _, body = post(server.url + "/v2/nothing", {})
    assert status == 404 and body["error"]["type"] == "not_found_error" and "/v1" in body["error"]["message"]
    status, body = get(server.url + "/v1/chat/completions", key=KEY)
    assert status == 405 and set(body["error"]) >= {"message", "type", "code"}
    preflight = urllib.request.Request(server.url + "/v1/chat/completions", method="OPTIONS", headers={
        "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    with urllib.request.urlopen(preflight, timeout=30) as r:  # no key: a browser's preflight carries none
        assert r.status == 200 and r.headers["access-control-allow-origin"] in ("*", "http://localhost:3000")
        assert "POST" in r.headers["access-control-allow-methods"]
    status, headers, _ = post(server.url + "/v1/completions", {"prompt": "w5", "max_tokens": 1}, key=None)
    assert status == 401 and headers.get("access-control-allow-origin") is None  # no Origin: no CORS headers


@pytest.mark.timeout(120)
def test_text_parts_are_joined_with_newlines_and_a_long_prompt_says_the_context(server, client, target):
    parts = [{"type": "text", "text": "w5 w7"}, {"type": "text", "text": "w9"}]
    out = client.chat.completions.create(model="m", messages=[{"role": "user", "content": parts}], max_tokens=6,
                                         temperature=0)
    assert out.usage.prompt_tokens == len(chat_ids("w5 w7\nw9")) == 4  # glued, "w7w9" would be one unknown word
    assert out.choices[0].message.content == expected_text(target, chat_ids("w5 w7\nw9"), 6)[0]
    long = " ".join(f"w{1 + i % 90}" for i in range(CTX + 20))
    for route, body in (("/v1/completions", {"prompt": long}), ("/v1/chat/completions",
                                                                 {"messages": [{"role": "user", "content": long}]})):
        status, _, err = post(server.url + route, {**body, "max_tokens": 4})
        assert status == 400 and err["error"]["code"] == "context_length_exceeded", (route, err)
        assert err["error"]["n_ctx"] == CTX and err["error"]["n_prompt_tokens"] >= CTX + 20


@pytest.mark.timeout(60)
def test_models_and_metrics(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [models.data[0].id, "my-alias"] and models.data[0].id
    _, before = get(server.url + "/metrics")
    client.completions.create(model=models.data[0].id, prompt="w4 w5 w6 w4 w5 w6 w4 w5", max_tokens=12, temperature=0)
    _, after = get(server.url + "/metrics")

    def value(text: str, name: str) -> float:
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")
                   or line.startswith(name + "{"))

    assert value(after, "dovetail:generation_tokens_total") - value(before, "dovetail:generation_tokens_total") == 12
    assert value(after, "dovetail:prompt_tokens_total") - value(before, "dovetail:prompt_tokens_total") == 8
    assert value(after, "dovetail:requests_success_total") == value(before, "dovetail:requests_success_total") + 1
    for name in ("dovetail:requests_running", "dovetail:requests_waiting", "dovetail:time_to_first_token_seconds_count",
                 "dovetail:spec_decode_num_draft_tokens_total", "dovetail:verify_pass_seconds_count"):
        assert name in after


@pytest.mark.timeout(120)
def test_concurrent_requests_each_get_their_solo_output_and_the_queue_bound_gives_503(server, target):
    """--parallel 2 --queue 1: of 5 requests at once, 2 run, 1 waits, 2 are refused with 503 + Retry-After;
    every one served equals the target's greedy output for its prompt."""
    tok = tiny_tokenizer()
    prompts = [f"w{a} w{a + 1} w{a + 2}" for a in (10, 20, 30, 40, 50)]
    results = [None] * len(prompts)
    start = threading.Barrier(len(prompts))

    def one(i):
        start.wait()
        results[i] = post(server.url + "/v1/completions", {"prompt": prompts[i], "max_tokens": 200, "temperature": 0,
                                                             "speculative": {"n_max": 0}})

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    served = [i for i, r in enumerate(results) if r[0] == 200]
    refused = [i for i, r in enumerate(results) if r[0] == 503]
    assert len(served) >= 3 and len(served) + len(refused) == len(prompts), [r[0] for r in results]
    for i in refused:
        assert results[i][1].get("retry-after") == "1" and results[i][2]["error"]["type"] == "unavailable_error"
    for i in served:
        body = json.loads(results[i][2])
        ids = tok(prompts[i], add_special_tokens=False)["input_ids"]
        assert body["choices"][0]["text"] == expected_text(target, ids, 200)[0]
        assert body["timings"]["draft_n"] == 0  # speculative.n_max = 0: drafting off


@pytest.mark.timeout(120)
def test_a_client_that_disconnects_frees_its_slot(server):
    """Both slots taken by streams that are dropped after their first event: the generations stop,
    and a third request is served at once instead of waiting for 400 tokens each."""
    import http.client

    def _metric(name):
        return sum(float(line.split()[-1]) for line in get(server.url + "/metrics")[1].splitlines()
                   if line.startswith(name + " "))

    before = _metric("dovetail:generation_tokens_total")
    conns = []
    for _ in range(2):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.request("POST", "/v1/completions", json.dumps({"prompt": "w5 w6", "max_tokens": 400, "stream": True,
                                                            "speculative": {"n_max": 0}, "temperature": 0}),
                     {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.readline().startswith(b"data: ")
        conns.append(conn)
    for conn in conns:
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
    status, _, body = post(server.url + "/v1/completions", {"prompt": "w7", "max_tokens": 3, "temperature": 0})
    assert status == 200
    deadline = time.monotonic() + 10
    while _metric("dovetail:requests_running") > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _metric("dovetail:requests_running") == 0
    assert _metric("dovetail:generation_tokens_total") - before < 2 * 400, "the dropped streams ran to the end"


@pytest.mark.timeout(180)
def test_chat_page_streams_a_reply_in_a_real_browser(server, target, tmp_path):
    """The page at / in headless Chromium (Debian's, installed by `setup.sh --dev`, driven by Playwright):
    a turn typed and sent with Enter streams the target's greedy reply, and the line under it shows
    tok/s, tau and acceptance. The screenshot is saved beside the test's temporary files."""
    import shutil

    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium: `bash launch/setup.sh --dev` installs Debian's chromium")
    text = "w5 w7 w9 w5 w7 w9"
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 700})
            page.goto(server.url + "/")
            page.fill("#key", KEY)
            page.fill("#input", text)
            page.press("#input", "Enter")
            page.wait_for_selector(".stats:not(:empty)", timeout=120_000)
            reply, stats = page.inner_text(".turn.assistant"), page.inner_text(".stats")
            shot = tmp_path / "chat-page.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert reply == expected_text(target, chat_ids(text), CTX - len(chat_ids(text)))[0]
    assert re.fullmatch(r"\d+ tokens, [\d.]+ tok/s, tau [\d.]+, acceptance (\d+%|-) \(\d+/\d+ drafted\), .*", stats), stats
    assert shot.stat().st_size > 5000
    print(f"chat page screenshot: {shot}")


@pytest.mark.timeout(180)
def test_a_verifier_that_dies_mid_stream_errs_that_stream_then_is_restarted_and_serves_again(model_dir, target):
    """The stream in flight ends with an error that says how the verifier died; /health is 503 while
    it restarts, then 200 with the restart counted; the next request gets the target's greedy output."""
    import http.client

    import psutil

    s = Server(model_dir, "-md", "ngram", "--parallel", "1", "--engine", "torch")
    try:
        s.wait_ready()
        verifier = next(p for p in psutil.Process(s.proc.pid).children(recursive=True) if "verifier" in " ".join(p.cmdline()))
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=60)
        conn.request("POST", "/v1/completions", json.dumps({"prompt": "w5 w6", "max_tokens": 400, "stream": True,
                                                            "speculative": {"n_max": 0}, "temperature": 0}),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.readline().startswith(b"data: ")
        verifier.kill()
        events = [line for line in resp.read().decode().splitlines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        error = json.loads(events[-2].removeprefix("data: "))["error"]
        assert error["type"] == "server_error" and "SIGKILL" in error["message"], error
        status, body = get(s.url + "/health")
        assert status == 503 and "restarting the verifier" in body["error"]["message"], body
        deadline = time.monotonic() + 90
        while status != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
            status, body = get(s.url + "/health")
        assert status == 200 and body["verifier"]["restarts"] == 1 and "SIGKILL" in body["verifier"]["last_death"]
        prompt = "w5 w6 w7"
        want, _ = expected_text(target, tiny_tokenizer()(prompt, add_special_tokens=False)["input_ids"], 12)
        status, _, text = post(s.url + "/v1/completions", {"prompt": prompt, "max_tokens": 12, "temperature": 0},
                               key=None)
        assert status == 200 and json.loads(text)["choices"][0]["text"] == want
    finally:
        s.stop()


@pytest.mark.timeout(180)
def test_requests_drafting_at_once_share_draft_passes_and_get_their_greedy_outputs(model_dir, target, tmp_path):
    """A small-LM draft shared by --parallel 4 requests: their draft forwards that wait together run as
    one pass of the draft model (/metrics: fewer passes than forwards), and every output is still the
    target's own greedy decode."""
    draft_dir = save_model(noisy_copy(tiny_target(0, sharpen=30), noise=0.3), tiny_tokenizer(), tmp_path / "draft")
    s = Server(model_dir, "-md", str(draft_dir), "--draft-dtype", "float32", "--parallel", "4", "--engine", "torch",
               "--draft-max", "4")
    try:
        s.wait_ready()
        tok = tiny_tokenizer()
        prompts = [f"w{a} w{a + 3} w{a + 1} w{a + 3}" for a in (11, 23, 35, 47)]
        results = [None] * len(prompts)
        start = threading.Barrier(len(prompts))

        def one(i):
            start.wait()
            results[i] = post(s.url + "/v1/completions", {"prompt": prompts[i], "max_tokens": 40, "temperature": 0})

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i, (status, _, body) in enumerate(results):
            assert status == 200, body
            body = json.loads(body)
            ids = tok(prompts[i], add_special_tokens=False)["input_ids"]
            assert body["choices"][0]["text"] == expected_text(target, ids, 40)[0]
            assert body["timings"]["draft_n"] > 0
        _, metrics = get(s.url + "/metrics")
        value = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
                 if line.startswith("dovetail:draft_")}
        assert 0 < value["dovetail:draft_passes"] < value["dovetail:draft_forwards"], value
    finally:
        s.stop()


@pytest.mark.timeout(240)
def test_a_seeded_request_gives_one_text_alone_and_among_others(model_dir):
    """20 repeats of one seeded request at temperature 0.8, half alone and half among 8 concurrent
    others, with the lookup index warmed by earlier requests: one text, the target's own (drafting off)."""
    s = Server(model_dir, "-md", "ngram", "--parallel", "4", "--queue", "16", "--engine", "torch")
    try:
        s.wait_ready()
        prompt = "w5 w7 w9 w11 w5 w7 w9 w11 w5 w7"
        body = {"prompt": prompt, "max_tokens": 48, "temperature": 0.8, "seed": 42}
        for seed in range(6):  # earlier outputs of the same prompt fill the lookup index
            assert post(s.url + "/v1/completions", {**body, "seed": 100 + seed}, key=None)[0] == 200
        status, _, own = post(s.url + "/v1/completions", {**body, "speculative": {"n_max": 0}}, key=None)
        own_text = json.loads(own)["choices"][0]["text"]
        texts, drafted = [], 0
        for _ in range(10):
            status, _, out = post(s.url + "/v1/completions", body, key=None)
            texts.append(json.loads(out)["choices"][0]["text"])
            drafted += json.loads(out)["timings"]["draft_n_accepted"]
        for round_ in range(10):
            results = [None] * 9
            others = [{**body, "prompt": f"w{20 + i} w{21 + i} w{20 + i} w{21 + i}", "seed": 7 * round_ + i}
                      for i in range(8)]

            def one(i):
                results[i] = post(s.url + "/v1/completions", body if i == 8 else others[i], key=None)

            threads = [threading.Thread(target=one, args=(i,)) for i in range(9)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert all(r[0] == 200 for r in results)
            texts.append(json.loads(results[8][2])["choices"][0]["text"])
        assert drafted > 0, "the lookup drafted nothing: the test would mean nothing"
        assert texts == [own_text] * 20
    finally:
        s.stop()


def target_logprobs(target, ids: list[int], n_prompt: int) -> torch.Tensor:
    """The target's raw log-probabilities ([n, vocab]) of each generated position of ``ids``."""
    with torch.no_grad():
        logits = target.model(torch.tensor([ids])).logits[0, n_prompt - 1 : len(ids) - 1]
    return torch.log_softmax(logits.float(), -1)


@pytest.mark.timeout(120)
def test_logprobs_are_the_targets_own_whole_and_streamed(client, target):
    text = "w5 w7 w9 w11 w5 w7 w9"
    msgs = [{"role": "user", "content": text}]
    out = client.chat.completions.create(model="m", messages=msgs, max_tokens=10, temperature=0.9, seed=3,
                                         logprobs=True, top_logprobs=3)
    tok, prompt = tiny_tokenizer(), chat_ids(text)
    content = out.choices[0].logprobs.content
    ids = tok(out.choices[0].message.content, add_special_tokens=False)["input_ids"]
    assert len(content) == len(ids) == out.usage.completion_tokens == 10
    want = target_logprobs(target, prompt + ids, len(prompt))
    for i, entry in enumerate(content):
        assert entry.token.strip() == tok.decode([ids[i]]).strip()
        assert entry.logprob == pytest.approx(want[i, ids[i]].item(), abs=1e-4)  # raw: before temperature
        best = want[i].topk(3)
        assert [e.logprob for e in entry.top_logprobs] == pytest.approx(best.values.tolist(), abs=1e-4)
        assert [e.token for e in entry.top_logprobs] == [tok.decode([j]) for j in best.indices.tolist()]
        assert entry.bytes == list(entry.token.encode())
    chunks = list(client.chat.completions.create(model="m", messages=msgs, max_tokens=10, temperature=0.9, seed=3,
                                                 logprobs=True, top_logprobs=3, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]  # the same seeded text, the same scores
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-5)  # (float rounding:
    # the steps differ in what the lookup drafted, so in the pass shapes that computed them)
    plain = client.chat.completions.create(model="m", messages=msgs, max_tokens=4, temperature=0)
    assert plain.choices[0].logprobs is None  # not asked: none computed or sent


@pytest.mark.timeout(120)
def test_completion_logprobs_have_tokens_offsets_and_alternatives(server, target):
    status, _, body = post(server.url + "/v1/completions", {"prompt": "w5 w7 w9", "max_tokens": 6, "temperature": 0,
                                                            "logprobs": 2})
    choice = json.loads(body)["choices"][0]
    lp = choice["logprobs"]
    assert status == 200 and len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 6
    tok = tiny_tokenizer()
    assert lp["tokens"] == [tok.decode([i]) for i in tok(choice["text"], add_special_tokens=False)["input_ids"]]
    assert lp["text_offset"] == [len("".join(lp["tokens"][:i])) for i in range(6)]  # of the tokens' own texts
    for chosen, top in zip(lp["token_logprobs"], lp["top_logprobs"]):
        assert len(top) == 2 and max(top.values()) == pytest.approx(chosen, abs=1e-5)  # greedy: the best one
    for body in ({"messages": [{"role": "user", "content": "w5"}], "top_logprobs": 2},  # without logprobs: true
                 {"messages": [{"role": "user", "content": "w5"}], "logprobs": True, "top_logprobs": 21}):
        status, _, err = post(server.url + "/v1/chat/completions", body)
        assert status == 400, err
