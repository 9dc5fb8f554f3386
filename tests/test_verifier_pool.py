"""`dovetail serve` in front of several verifiers: requests spread over them, and a verifier that dies mid-run
costs no request (its sessions resume on the others, greedy output unchanged)."""

from __future__ import annotations

import threading

import pytest

from dovetail_rt.verifier_pool import VerifierPool

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
    finally:
        server.stop()
        for v in verifiers:
            v.stop()
