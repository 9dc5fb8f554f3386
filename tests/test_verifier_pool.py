"""`dovetail serve` in front of several verifiers: requests spread over them, and a verifier that dies mid-run
costs no request (its sessions resume on the others, greedy output unchanged)."""

from __future__ import annotations

import signal
import threading
import time
import urllib.request

import pytest

from dovetail_rt.verifier_pool import MIN_PREFIX, VerifierPool, common_prefix

from conftest import VerifierProcess
from test_server import KEY, Server, chat_ids, expected_text, get, model_dir, openai, target  # noqa: F401  (fixtures)


class Conn:
    def __init__(self, endpoint):
        self.endpoint = endpoint


class Held:
    """What the pool reads of a Client: where its session lives."""

    def __init__(self, endpoint):
        self.conn = Conn(endpoint)


def test_requests_go_to_the_verifier_running_fewest_and_lost_sessions_to_the_live_one_holding_fewest():
    pool = VerifierPool(["a", "b", "c"])
    clients = [Held(e) for e in "aaabbbccc"]
    idle, running = list(clients), []
    for _ in range(8):
        c = idle.pop(pool.pick(idle))
        pool.started(c)
        running.append(c)
    assert sorted(pool.running[e] for e in "abc") == [2, 3, 3]  # never one above its fair share while another has room
    lost = next(c for c in running if c.conn.endpoint == "b")
    clients[0].conn = None  # a closed link holds nothing
    assert pool.elsewhere(lost, clients) == "a"  # b is down now; a holds 2 sessions, c 3
    assert pool.is_down("b") and [r["state"] for r in pool.report(clients)] == ["ok", "down", "ok"]
    idle = [Held("b"), Held("c")]
    assert idle[pool.pick(idle)].conn.endpoint == "c"  # a down verifier's Clients come last
    for c in running:
        pool.finished(c)
    assert all(pool.running[e] == 0 for e in "abc")


def test_a_verifier_twice_as_fast_takes_twice_the_requests():
    """Hosts differ: each request goes where the running ones, this one counted, take the least time
    (the one-token step of the curve each verifier sent in WELCOME)."""
    pool = VerifierPool(["fast", "slow", "unmeasured"])
    pool.learn({"fast": {1: 0.04, 2: 0.08}, "slow": {1: 0.08, 2: 0.16}, "unmeasured": {}})
    assert pool.step_s == {"fast": 0.04, "slow": 0.08, "unmeasured": pytest.approx(0.06)}  # none sent: the median
    idle = [Held(e) for e in ["fast"] * 8 + ["slow"] * 8]
    for _ in range(6):
        pool.started(idle.pop(pool.pick(idle)))
    assert (pool.running["fast"], pool.running["slow"]) == (4, 2)


def test_a_prompt_goes_to_the_verifier_holding_its_history_within_the_fair_share():
    pool = VerifierPool(["a", "b", "c"])
    history = list(range(100, 160))  # turn 1's prompt and answer, finished on b
    on_b = Held("b")
    pool.started(on_b)
    pool.finished(on_b, history)
    assert pool.cached_prefix("b", history + [7, 8]) == 60 and pool.cached_prefix("a", history) == 0
    idle = [Held("a"), Held("b"), Held("c")]
    turn2 = history + list(range(5, 25))
    assert idle[pool.pick(idle, turn2)].conn.endpoint == "b"  # its prefix cache holds 60 of the prompt's tokens
    assert idle[pool.pick(idle, list(range(5, 80)))].conn.endpoint == "c"  # nothing shared: the least loaded
    assert idle[pool.pick(idle, history[:MIN_PREFIX - 1])].conn.endpoint == "c"  # too little shared to matter
    for e in "ac":  # a chat template every verifier holds decides nothing: only what b holds beyond it
        done = Held(e)
        pool.started(done)
        pool.finished(done, history[:30] + [1, 2, 3])
    assert idle[pool.pick(idle, history[:30] + [9] * 40)].conn.endpoint == "c"
    assert idle[pool.pick(idle, turn2)].conn.endpoint == "b"  # 60 against 30: b's cache saves 30 more
    for c in (Held("b"), Held("b")):  # b runs two, a and c none: b is past the fair share (ceil(3 / 3) = 1)
        pool.started(c)
    assert idle[pool.pick(idle, turn2)].conn.endpoint != "b"
    pool.down["b"] = time.monotonic()  # a verifier that stopped answering is never preferred for its cache
    pool.running.clear()
    assert idle[pool.pick(idle, turn2)].conn.endpoint != "b"
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2 and common_prefix([], [1]) == 0 and common_prefix([5] * 9, [5] * 9) == 9


@pytest.mark.timeout(300)
def test_three_verifiers_one_killed_mid_run_lose_no_request_and_keep_greedy_output(model_dir, target):  # noqa: F811
    verifiers = [VerifierProcess(model_dir) for _ in range(3)]
    server = Server(model_dir, *[a for v in verifiers for a in ("--verifier", v.endpoint)], "-md", "ngram",
                    "--parallel", "3", "--queue", "16", "--api-key", KEY, "-c", "320", "--timeout", "5")
    try:
        server.wait_ready()
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
        texts = [" ".join(f"w{(5 * i + k) % 40 + 2}" for k in range(5)) for i in range(8)]
        n_new = 160
        first_tokens, results = threading.Barrier(len(texts) + 1), [None] * len(texts)

        def stream(i):
            try:
                parts = []
                for k, chunk in enumerate(client.chat.completions.create(
                        model="x", messages=[{"role": "user", "content": texts[i]}], max_tokens=n_new, temperature=0,
                        stream=True)):
                    parts.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
                    if k == 1:
                        first_tokens.wait(timeout=60)
                results[i] = "".join(parts)
            except Exception as exc:  # noqa: BLE001  (a lost request is what the test counts)
                results[i] = exc

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(texts))]
        for t in threads:
            t.start()
        first_tokens.wait(timeout=60)  # all eight are generating
        status, health = get(server.url + "/health")
        assert status == 200 and sorted(v["running"] for v in health["verifiers"]) == [2, 3, 3], health
        verifiers[1].proc.kill()  # mid-run: its sessions' next step finds no verifier
        for t in threads:
            t.join(timeout=120)
        lost = [r for r in results if not isinstance(r, str)]
        assert not lost, f"{len(lost)} requests lost: {lost[:2]}"
        for got, text in zip(results, texts):
            assert got == expected_text(target, chat_ids(text), n_new)[0]
        after = [client.chat.completions.create(model="x", messages=[{"role": "user", "content": t}], max_tokens=8,
                                                temperature=0).choices[0].message.content for t in texts[:3]]
        assert after == [expected_text(target, chat_ids(t), 8)[0] for t in texts[:3]]
        status, health = get(server.url + "/health")
        states = {v["endpoint"]: v["state"] for v in health["verifiers"]}
        assert states[verifiers[1].endpoint] == "down" and list(states.values()).count("ok") == 2, health
        with urllib.request.urlopen(server.url + "/metrics", timeout=10) as r:
            scraped = r.read().decode()
        for v in verifiers:
            up = 0.0 if v is verifiers[1] else 1.0
            assert f'dovetail:verifier_up{{endpoint="{v.endpoint}"}} {up}' in scraped, scraped[-1500:]
        assert all(f'dovetail:verifier_sessions{{endpoint="{v.endpoint}"}}' in scraped for v in verifiers)
    finally:
        server.stop()
        for v in verifiers:
            v.stop()


@pytest.mark.timeout(200)
def test_a_request_that_no_verifier_answered_fails_alone_and_the_server_serves_the_next(model_dir, target):  # noqa: F811
    """Both verifiers stop answering (SIGSTOP) during a request: its session is lost and its resume finds no
    live verifier, so that request fails with why; once they answer again the next request is served (the
    server did not take one request's failure for its own)."""
    verifiers = [VerifierProcess(model_dir) for _ in range(2)]
    server = Server(model_dir, *[a for v in verifiers for a in ("--verifier", v.endpoint)], "-md", "ngram",
                    "--parallel", "1", "--api-key", KEY, "-c", "320", "--timeout", "2")
    try:
        server.wait_ready()
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
        for v in verifiers:
            v.proc.send_signal(signal.SIGSTOP)
        with pytest.raises(openai.APIError):
            client.chat.completions.create(model="x", messages=[{"role": "user", "content": "w3 w4 w5"}], max_tokens=8,
                                           temperature=0)
        for v in verifiers:
            v.proc.send_signal(signal.SIGCONT)
        got = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "w3 w4 w5"}], max_tokens=8,
                                             temperature=0).choices[0].message.content
        assert got == expected_text(target, chat_ids("w3 w4 w5"), 8)[0]
        status, health = get(server.url + "/health")
        assert status == 200 and "down" in [v["state"] for v in health["verifiers"]], health
    finally:
        for v in verifiers:
            v.proc.send_signal(signal.SIGCONT)
        server.stop()
        for v in verifiers:
            v.stop()
