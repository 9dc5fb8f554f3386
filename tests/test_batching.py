"""Sessions batched in the verifier: VERIFYs of different sessions that wait together run as one
forward pass, and each session gets exactly what it gets alone (greedy: the same tokens; seeded
sampling: the same tokens for the same seed, since each session keeps its own generator)."""

import threading
from pathlib import Path

import pytest

from dovetail_rt import Client, SamplingParams
from dovetail_rt.config import DraftConfig

from conftest import VerifierProcess, noisy_copy, tiny_target, tiny_tokenizer

PROMPTS = [[5, 7, 9, 11], [40, 2, 2, 2, 2, 2, 60, 61, 3], list(range(1, 30)), [80, 81], [13, 14, 15, 16, 17], [3]]
CONFIGS = [  # chains and trees side by side in one pass
    DraftConfig(draft_max=3, p_min=0.0, adaptive=False),
    DraftConfig(tree_top_k=2, tree_depth=3, tree_tokens=6, adaptive=False),
    DraftConfig(draft_max=1, p_min=0.0, adaptive=False),
]
N_NEW = 48


@pytest.fixture(scope="module", params=["llamacpp", "torch"])
def verifier(request, tiny_dir, tmp_path_factory):
    if request.param == "torch":
        proc = VerifierProcess(tiny_dir)
    else:
        pytest.importorskip("llama_cpp")
        from tiny_gguf import write_gguf

        vocab = [t for t, _ in sorted(tiny_tokenizer().get_vocab().items(), key=lambda kv: kv[1])]
        path = write_gguf(tiny_target(0, sharpen=30), vocab, tmp_path_factory.mktemp("gguf") / "tiny.gguf")
        proc = VerifierProcess(path, "--engine", "llamacpp", "--ctx-size", "512")
    yield proc
    proc.stop()


def generate_each(endpoint, requests, together: bool):
    """Run each request on its own Client, all at once (threads released together) or one by one."""
    draft = noisy_copy(tiny_target(0, sharpen=30), noise=0.3)
    results = [None] * len(requests)
    start = threading.Barrier(len(requests) if together else 1)

    def run(i):
        prompt, cfg, sampling = requests[i]
        with Client(verifier=endpoint, draft=draft, draft_config=cfg, timeout_s=60) as client:
            start.wait()
            results[i] = client.generate(prompt, N_NEW, **sampling)

    if together:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for i in range(len(requests)):
            run(i)
    return results


@pytest.mark.timeout(300)
@pytest.mark.parametrize("sampling", ["greedy", "seeded"])
def test_batched_sessions_get_their_solo_outputs(verifier, sampling):
    params = lambda i: {} if sampling == "greedy" else {"sampling": SamplingParams(0.8, top_p=0.95), "seed": 1000 + i}
    requests = [(p, CONFIGS[i % len(CONFIGS)], params(i)) for i, p in enumerate(PROMPTS)]
    together = generate_each(verifier.endpoint, requests, together=True)
    alone = generate_each(verifier.endpoint, requests, together=False)
    for i, (a, b) in enumerate(zip(together, alone)):
        assert a.token_ids == b.token_ids, f"request {i}: batched output differs from its solo output"
        assert len(a.token_ids) == N_NEW
    shared = sum(g.stats.shared_steps for g in together)
    assert all(g.stats.shared_steps == 0 for g in alone)  # alone: every pass held one session
    assert shared > 0, "no two sessions ever shared a pass: the test did not exercise batching"


# ---- prompts go in a chunk per pass, beside other sessions' steps (in-process verifier) -----------
def in_process_verifier(chunk: int):
    from dovetail_rt import lm
    from dovetail_rt.config import VerifierConfig
    from dovetail_rt.verifier import Verifier

    pytest.importorskip("llama_cpp")
    import tempfile

    from tiny_gguf import write_gguf

    vocab = [t for t, _ in sorted(tiny_tokenizer().get_vocab().items(), key=lambda kv: kv[1])]
    path = write_gguf(tiny_target(0, sharpen=30), vocab, Path(tempfile.mkdtemp()) / "tiny.gguf")
    target = lm.open_lm(str(path), Path("."), "llamacpp", threads=1, n_ctx=512, sessions=3)
    return Verifier(target, VerifierConfig(model="tiny", home=Path("."), prefill_chunk=chunk))


def test_a_long_prompt_goes_in_by_chunks_without_stalling_another_session():
    from dovetail_rt import protocol
    from dovetail_rt.protocol import Message, MsgType

    v = in_process_verifier(chunk=16)
    ask = lambda identity, msg: protocol.encode(msg)
    sid = {}
    for peer in (b"a", b"b", b"c"):
        ((_, welcome),) = v.step([(peer, ask(peer, Message(MsgType.HELLO, 1, {"vocab": []})))])
        sid[peer] = welcome.fields["session"]
    long_prompt = [(7 * i) % 90 + 3 for i in range(300)]
    ((_, first_a),) = v.reply_all([(b"a", ask(b"a", Message(MsgType.START, 2, {"session": sid[b"a"], "prompt": [5, 6, 7]})))])
    # b starts a 300-token prompt while a verifies step after step
    replies = v.step([(b"b", ask(b"b", Message(MsgType.START, 3, {"session": sid[b"b"], "prompt": long_prompt}))),
                      (b"a", ask(b"a", Message(MsgType.VERIFY, 4, {"session": sid[b"a"], "tokens": [], "parents": []})))])
    assert [peer for peer, _ in replies] == [b"a"], "a's step waited for b's whole prompt"
    assert replies[0][1].fields["batch"] == 2 and replies[0][1].fields["rows"] == 1 + 16
    passes = 1
    while not any(peer == b"b" for peer, _ in replies):
        replies = v.step([(b"a", ask(b"a", Message(MsgType.VERIFY, 5, {"session": sid[b"a"], "tokens": [], "parents": []})))])
        passes += 1
        assert replies[0][0] == b"a"
    assert passes == -(-len(long_prompt) // 16)  # one chunk per pass
    chunked = next(r for peer, r in replies if peer == b"b").fields["bonus"]
    # the same prompt in one session alone, in chunks of the whole batch, gives the same first token
    alone = in_process_verifier(chunk=256)
    ((_, w),) = alone.step([(b"c", ask(b"c", Message(MsgType.HELLO, 1, {"vocab": []})))])
    ((_, r),) = alone.reply_all([(b"c", ask(b"c", Message(MsgType.START, 2, {"session": w.fields["session"],
                                                                            "prompt": long_prompt})))])
    assert chunked == r.fields["bonus"]


def test_every_start_gets_its_one_reply_when_superseded_or_its_session_ends():
    """A START whose prompt is still going in gets an error reply (not silence) when a newer START on its
    session replaces it, or when the session is ended."""
    from dovetail_rt import protocol
    from dovetail_rt.protocol import Message, MsgType

    v = in_process_verifier(chunk=16)
    ask = lambda msg: [(b"a", protocol.encode(msg))]
    ((_, welcome),) = v.step(ask(Message(MsgType.HELLO, 1, {"vocab": []})))
    sid, long_prompt = welcome.fields["session"], [(7 * i) % 90 + 3 for i in range(100)]
    assert v.step(ask(Message(MsgType.START, 2, {"session": sid, "prompt": long_prompt}))) == []  # going in
    replies = v.reply_all(ask(Message(MsgType.START, 3, {"session": sid, "prompt": [5, 6, 7]})))
    assert [(r.seq, r.type, r.fields.get("code")) for _, r in replies] == [(2, MsgType.ERROR, "superseded"),
                                                                          (3, MsgType.RESULT, None)]
    assert v.step(ask(Message(MsgType.START, 4, {"session": sid, "prompt": long_prompt}))) == []
    replies = v.step(ask(Message(MsgType.END, 5, {"session": sid})))
    assert sorted((r.seq, r.type, r.fields.get("code")) for _, r in replies) == [(4, MsgType.ERROR, "unknown_session"),
                                                                                (5, MsgType.BYE, None)]
    assert not v.sessions and not v.prefilling
