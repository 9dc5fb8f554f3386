"""The link against a real verifier process: handshake, refusals, and a dead verifier."""

import os
import signal
import time

import msgpack
import pytest
import zmq

from dovetail_rt import Client, protocol
from dovetail_rt.client import VerifierError
from dovetail_rt.protocol import Message, MsgType
from dovetail_rt.transport import LinkError

from conftest import VerifierProcess, noisy_copy, tiny_target, tiny_tokenizer


class RawPeer:
    """A hand-driven DEALER that can send anything at all."""

    def __init__(self, endpoint):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def ask(self, frames, timeout_ms=10000) -> Message:
        self.sock.send_multipart(frames)
        assert self.sock.poll(timeout_ms), "the verifier did not answer"
        return protocol.decode(self.sock.recv_multipart())

    def send(self, msg: Message) -> Message:
        return self.ask(protocol.encode(msg))

    def close(self):
        self.sock.close(0)


@pytest.fixture
def peer(verifier):
    p = RawPeer(verifier.endpoint)
    yield p
    p.close()


def open_session(peer) -> int:
    vocab = [t for t, _ in sorted(tiny_tokenizer().get_vocab().items(), key=lambda kv: kv[1])]
    reply = peer.send(Message(MsgType.HELLO, 1, {"vocab": vocab}))
    assert reply.type == MsgType.WELCOME
    return reply.fields["session"]


@pytest.mark.timeout(60)
def test_malformed_messages_get_error_replies_and_service_goes_on(verifier, peer):
    sid = open_session(peer)
    assert peer.send(Message(MsgType.START, 2, {"session": sid, "prompt": [1, 2, 3]})).type == MsgType.RESULT
    cases = {
        "bad_type": [b"\x63", msgpack.packb([1, 3, {}])],
        "malformed": [b"\x04", b"\xc1\xc1"],
        "version": [b"\x04", msgpack.packb([999, 3, {"session": sid}])],
        "unknown_session": protocol.encode(Message(MsgType.VERIFY, 3, {"session": 12345, "tokens": [1], "parents": [0]})),
        "out_of_range": protocol.encode(Message(MsgType.VERIFY, 3, {"session": sid, "tokens": [1, 99], "parents": [0, 1]})),
        "bad_tree": protocol.encode(Message(MsgType.VERIFY, 3, {"session": sid, "tokens": [1, 2], "parents": [0, 2]})),
        "too_large": [b"\x04", msgpack.packb([1, 3, {"tensors": [["x", "uint8", [80 << 20], 2]]}]), b"\x00" * (80 << 20)],
    }
    for code, frames in cases.items():
        reply = peer.ask(frames)
        assert reply.type == MsgType.ERROR and reply.fields["code"] == code, (code, reply.fields)
        assert reply.fields["message"]
    # a bad shape: tokens that are not a list
    reply = peer.send(Message(MsgType.VERIFY, 4, {"session": sid, "tokens": "abc", "parents": []}))
    assert reply.type == MsgType.ERROR
    # the session survived every refusal and still verifies
    reply = peer.send(Message(MsgType.VERIFY, 5, {"session": sid, "tokens": [1, 2], "parents": [0, 1]}))
    assert reply.type == MsgType.RESULT and reply.seq == 5
    assert verifier.proc.poll() is None


@pytest.mark.timeout(60)
def test_tokenizer_mismatch_refused_naming_the_token(verifier):
    draft = noisy_copy(tiny_target(0), 0.1)
    with pytest.raises(VerifierError) as err:
        Client(verifier=verifier.endpoint, draft=draft, tokenizer=tiny_tokenizer(prefix="x"), timeout_s=10)
    assert err.value.code == "tokenizer_mismatch"
    assert "at id 1" in str(err.value) and "'x1'" in str(err.value) and "'w1'" in str(err.value)


def test_tokenizer_check_tolerates_vocabulary_padding_only():
    """A GGUF pads its vocabulary past the tokenizer's end ("[PAD151665]" rows); a real extra token is refused."""
    from dovetail_rt.verifier import tokenizer_mismatch

    base = ["a", "b", "<|im_end|>"]
    assert tokenizer_mismatch(base, base + ["[PAD3]", "[PAD4]"]) is None
    assert tokenizer_mismatch(base + ["", "[PAD4]"], base) is None
    assert "only the target has it ('<|extra|>')" in tokenizer_mismatch(base, base + ["<|extra|>"])


@pytest.mark.timeout(60)
def test_version_mismatch_refused(verifier, peer):
    reply = peer.ask([bytes([MsgType.HELLO]), msgpack.packb([protocol.PROTOCOL_VERSION + 1, 1, {}])])
    assert reply.type == MsgType.ERROR and reply.fields["code"] == "version"
    assert "version" in reply.fields["message"]


@pytest.mark.timeout(60)
def test_sessions_are_isolated(verifier):
    """Two clients whose steps alternate on one verifier (A's step, B's step, ...) each get the output
    they get alone: one session's KV cache never sees the other's tokens."""
    target = tiny_target(0, sharpen=30)
    a = Client(verifier=verifier.endpoint, draft=noisy_copy(target, 0.3), tokenizer=tiny_tokenizer(), timeout_s=30)
    b = Client(verifier=verifier.endpoint, draft=noisy_copy(target, 0.3, seed=5), tokenizer=tiny_tokenizer(), timeout_s=30)
    with a, b:
        solo_a = a.generate([1, 2, 3], 20).token_ids
        solo_b = b.generate([7, 8], 20).token_ids
        streams = {"a": a.stream([1, 2, 3], 20), "b": b.stream([7, 8], 20)}
        got, turns = {"a": [], "b": []}, []
        while streams:
            for name in list(streams):  # one step of each session in turn
                tokens = next(streams[name], None)
                if tokens is None:
                    del streams[name]
                else:
                    got[name] += tokens
                    turns.append(name)
        assert got == {"a": solo_a, "b": solo_b}
        assert turns[:4] == ["a", "b", "a", "b"], "the two generations must really alternate step by step"
        assert a.session != b.session


@pytest.mark.timeout(60)
def test_killed_verifier_detected_fast(tiny_dir):
    """A verifier that dies and does not come back: the client notices at once, tries to resume on a
    new session within its timeout, then fails with an error that says both."""
    proc = VerifierProcess(tiny_dir)
    client = Client(verifier=proc.endpoint, draft=noisy_copy(tiny_target(0), 0.1), timeout_s=5)
    try:
        client.generate([1, 2], 5)
        os.kill(proc.proc.pid, signal.SIGKILL)
        proc.proc.wait()
        t0 = time.monotonic()
        with pytest.raises(LinkError, match="(closed the connection|did not answer).*could not be resumed"):
            client.generate([1, 2], 5)
        assert time.monotonic() - t0 < 5 + 5
    finally:
        client.close()
        proc.stop()


@pytest.mark.timeout(60)
def test_hung_verifier_times_out(tiny_dir):
    proc = VerifierProcess(tiny_dir)
    client = Client(verifier=proc.endpoint, draft=noisy_copy(tiny_target(0), 0.1), timeout_s=2)
    try:
        os.kill(proc.proc.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(LinkError, match="did not answer within 2.0 s"):
            client.generate([1, 2], 5)
        assert 1.5 < time.monotonic() - t0 < 8  # 2 s, a 1 s END for the old session, 2 s for the resume's HELLO
    finally:
        os.kill(proc.proc.pid, signal.SIGCONT)
        client.close()
        proc.stop()


@pytest.mark.timeout(30)
def test_no_verifier_fails_with_clear_error():
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    sock.close(0)  # nothing listens there now
    with pytest.raises(LinkError, match="is `dovetail verifier` running"):
        Client(verifier=f"tcp://127.0.0.1:{port}", draft=noisy_copy(tiny_target(0), 0.1), timeout_s=1.5)
