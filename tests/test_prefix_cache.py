"""The verifier's prefix cache: a later prompt that starts with what a finished session held prefills only
the rest, and its output is the same as without the cache (greedy, float32 tiny models, both engines)."""

from pathlib import Path

import pytest

from dovetail_rt import Client
from dovetail_rt.config import DraftConfig
from dovetail_rt.prefix_cache import MIN_REUSE, PrefixCache, common_prefix

from conftest import VerifierProcess, noisy_copy, tiny_target, tiny_tokenizer

TURN_1 = [5, 7, 9, 11, 40, 2, 2, 60, 61, 3, 13, 14]
N_NEW = 24
CHAIN = DraftConfig(draft_max=3, p_min=0.0, adaptive=False)


def tiny_gguf(tmp_path_factory) -> Path:
    pytest.importorskip("llama_cpp")
    from tiny_gguf import write_gguf

    vocab = [t for t, _ in sorted(tiny_tokenizer().get_vocab().items(), key=lambda kv: kv[1])]
    return write_gguf(tiny_target(0, sharpen=30), vocab, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="module", params=["llamacpp", "torch"])
def pair(request, tiny_dir, tmp_path_factory):
    """Two verifiers of the same target: with the prefix cache (the default) and without (--prefix-cache 0)."""
    if request.param == "torch":
        model, extra = tiny_dir, ()
    else:
        model, extra = tiny_gguf(tmp_path_factory), ("--engine", "llamacpp", "--ctx-size", "512")
    cached, plain = VerifierProcess(model, *extra), VerifierProcess(model, *extra, "--prefix-cache", "0")
    yield cached, plain
    cached.stop()
    plain.stop()


def chat(endpoint: str) -> list:
    """Two turns, each on its own Client (its own verifier session): the second prompt repeats the first
    turn's prompt and output, then adds a user turn."""
    draft = noisy_copy(tiny_target(0, sharpen=30), noise=0.3)
    outs = []
    prompt = TURN_1
    for extra in ([], [30, 31, 32, 5, 7]):
        prompt = prompt + extra
        with Client(verifier=endpoint, draft=draft, draft_config=CHAIN, timeout_s=60) as client:
            out = client.generate(prompt, N_NEW)
        outs.append(out)
        prompt = prompt + out.token_ids
    return outs


@pytest.mark.timeout(240)
def test_a_second_turn_reuses_the_first_and_gives_the_same_greedy_output(pair):
    cached, plain = pair
    with_cache, without = chat(cached.endpoint), chat(plain.endpoint)
    assert [o.token_ids for o in with_cache] == [o.token_ids for o in without]
    assert [o.stats.n_cached for o in without] == [0, 0]
    first, second = with_cache
    assert first.stats.n_cached == 0
    # the first turn's session ENDed: its state (prompt + output but the last token, the root) went to the
    # cache, and the second turn's new session took it
    assert second.stats.n_cached >= len(TURN_1) + len(first.token_ids) - 1


def test_a_session_reuses_its_own_state_for_its_next_prompt(pair):
    cached, _ = pair
    first = [70, 71, 72, 73, 74, 75, 76, 77]  # shares nothing with the other tests' prompts
    with Client(verifier=cached.endpoint, draft=None, timeout_s=60) as client:
        a = client.generate(first, 8)
        b = client.generate(first + a.token_ids + [30, 31], 8)
        c = client.generate([90, 91, 92, 93, 94], 4)  # nothing in common: prefilled whole
    assert a.stats.n_cached == 0 and b.stats.n_cached >= len(first) + 7 and c.stats.n_cached == 0


def test_a_pass_short_of_room_evicts_cached_states_before_refusing_anyone(tmp_path_factory):
    """llama.cpp's KV pool is shared: a state kept in the cache gives its cells back when a live session needs them."""
    from dovetail_rt import lm, protocol
    from dovetail_rt.config import VerifierConfig
    from dovetail_rt.protocol import Message, MsgType
    from dovetail_rt.verifier import Verifier

    target = lm.open_lm(str(tiny_gguf(tmp_path_factory)), Path("."), "llamacpp", threads=1, n_ctx=512, sessions=1)
    v = Verifier(target, VerifierConfig(model="tiny", home=Path("."), prefill_chunk=256))
    ask = lambda msg: [(b"a", protocol.encode(msg))]
    n = 300
    assert 2 * n > target.kv_cells, "the two prompts must not fit in the pool together"
    for seq, prompt in ((2, [(7 * i) % 90 + 3 for i in range(n)]), (5, [(11 * i) % 90 + 3 for i in range(n)])):
        ((_, welcome),) = v.step(ask(Message(MsgType.HELLO, seq, {"vocab": []})))
        sid = welcome.fields["session"]
        (*_, (_, reply)) = v.reply_all(ask(Message(MsgType.START, seq + 1, {"session": sid, "prompt": prompt})))
        assert reply.type == MsgType.RESULT, reply.fields
        v.step(ask(Message(MsgType.END, seq + 2, {"session": sid})))
        assert len(v.cache.entries) == 1  # the first state was evicted to make room for the second prompt
    target.close()


def test_the_cache_keeps_the_longest_prefix_least_recently_used_first_within_its_budget():
    closed = []

    class State:
        def __init__(self, name):
            self.name = name

        def close(self):
            closed.append(self.name)

    cache = PrefixCache(max_tokens=20)
    cache.put([1, 2, 3, 4, 5, 6], State("a"))
    cache.put([1, 2, 3, 4, 9, 9, 9, 9], State("b"))
    cache.put([1, 2], State("short"))  # under MIN_REUSE: closed at once
    assert closed == ["short"] and common_prefix([1, 2, 3], [1, 2, 4], 9) == 2 and MIN_REUSE == 4
    entry, n = cache.take([1, 2, 3, 4, 9, 9, 7], limit=6)
    assert entry.state.name == "b" and n == 6 and [e.state.name for e in cache.entries] == ["a"]
    assert cache.take([1, 2, 3, 4, 5, 6, 7], limit=6, better_than=6) is None  # the own state wins
    assert cache.take([1, 2, 3, 9], limit=3) is None  # under MIN_REUSE shared
    cache.put(list(range(10, 20)), State("c"))
    cache.put(list(range(30, 40)), State("d"))  # 6 + 10 + 10 > 20: the oldest goes
    assert closed == ["short", "a"] and [e.state.name for e in cache.entries] == ["c", "d"]
    cache.drop_idle(cutoff=float("inf"))
    assert closed == ["short", "a", "c", "d"] and not cache.entries
    from dovetail_rt.prefix_cache import MAX_ENTRIES

    many = PrefixCache(max_tokens=10_000)  # each state holds a llama.cpp sequence id: their number is bounded too
    for i in range(MAX_ENTRIES + 8):
        many.put([i, 1, 2, 3, 4], State(i))
    assert len(many.entries) == MAX_ENTRIES and many.entries[0].state.name == 8
