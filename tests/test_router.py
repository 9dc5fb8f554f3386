"""The README's router recipe: two `dovetail serve` processes on 127.0.0.1 behind LiteLLM's Router
(least-busy routing, retries on another server), 16 concurrent streams, one server stopped mid-run:
every request is answered whole with the target's greedy text, and both servers served some."""

from __future__ import annotations

import asyncio
import os

import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no download of litellm's price list at import
litellm = pytest.importorskip("litellm")

from test_server import KEY, Server, chat_ids, expected_text, model_dir, target  # noqa: E402,F401  (fixtures)

STREAMS = 16
N_NEW = 24


def router_for(servers) -> "litellm.Router":
    deployments = [{"model_name": "dovetail", "litellm_params": {"model": "openai/dovetail", "api_base": s.url + "/v1",
                                                                   "api_key": KEY, "timeout": 60}} for s in servers]
    return litellm.Router(model_list=deployments, routing_strategy="least-busy", num_retries=3, retry_after=0,
                          allowed_fails=1, cooldown_time=60)


async def stream_one(router, text: str) -> tuple[str, str]:
    """One streamed chat through the router -> (text, the server that answered)."""
    response = await router.acompletion(model="dovetail", messages=[{"role": "user", "content": text}],
                                        max_tokens=N_NEW, temperature=0, stream=True)
    parts = [chunk.choices[0].delta.content or "" async for chunk in response if chunk.choices]
    return "".join(parts), str(response._hidden_params.get("api_base"))


@pytest.mark.timeout(400)
def test_two_servers_behind_a_router_lose_nothing_when_one_stops(model_dir, target):  # noqa: F811
    servers = [Server(model_dir, "-md", "ngram", "--parallel", "2", "--queue", "16", "--api-key", KEY,
                      "--engine", "torch", "-c", "320") for _ in range(2)]
    try:
        for s in servers:
            s.wait_ready()
        router = router_for(servers)
        texts = [" ".join(f"w{(3 * i + k) % 40 + 2}" for k in range(6)) for i in range(STREAMS)]

        async def run():
            half = STREAMS // 2
            first = [asyncio.ensure_future(stream_one(router, t)) for t in texts[:half]]
            while sum(f.done() for f in first) < 2:
                await asyncio.sleep(0.01)
            servers[1].proc.terminate()  # mid-run: what it holds finishes (graceful shutdown), then it refuses
            rest = [asyncio.ensure_future(stream_one(router, t)) for t in texts[half:]]
            return await asyncio.gather(*first, *rest, return_exceptions=True)

        answers = asyncio.run(run())
        lost = [a for a in answers if isinstance(a, BaseException)]
        assert not lost, f"{len(lost)} requests lost: {lost[:2]}"
        for (got, _), text in zip(answers, texts):
            assert got == expected_text(target, chat_ids(text), N_NEW)[0]
        served = {base for _, base in answers}
        assert {s.url + "/v1" for s in servers} <= served, f"the router used only {served}"
    finally:
        for s in servers:
            s.stop()
