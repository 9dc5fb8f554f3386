"""Faults end to end over real sockets: sessions one peer cannot take from another, idle sessions
reclaimed, and a draft side that rides through a lost session or a restarted verifier."""

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from dovetail_rt import Client
from dovetail_rt.config import DraftConfig
from dovetail_rt.lm_torch import open_model as open_torch
from dovetail_rt.protocol import Message, MsgType

from conftest import VerifierProcess, engine_greedy, noisy_copy, tiny_target, tiny_tokenizer
from test_link import RawPeer, open_session

CHAIN = DraftConfig(draft_max=3, p_min=0.0, adaptive=False)


@pytest.fixture(scope="module")
def target_lm():
    return open_torch("tiny", Path("."), model=tiny_target(0, sharpen=30))


def hello(peer) -> Message:
    vocab = [t for t, _ in sorted(tiny_tokenizer().get_vocab().items(), key=lambda kv: kv[1])]
    return peer.send(Message(MsgType.HELLO, 1, {"vocab": vocab}))


@pytest.mark.timeout(60)
def test_full_verifier_refuses_as_busy_and_keeps_every_session(tiny_dir):
    """At the session limit a new HELLO gets `busy` with when to retry; nobody's session is closed."""
    proc = VerifierProcess(tiny_dir, "--max-sessions", "2")
    a, b, c = RawPeer(proc.endpoint), RawPeer(proc.endpoint), RawPeer(proc.endpoint)
    try:
        sa, sb = open_session(a), open_session(b)
        refused = hello(c)
        assert refused.type == MsgType.ERROR and refused.fields["code"] == "busy"
        assert refused.fields["retry_after"] >= 1 and "retry in" in refused.fields["message"]
        for peer, sid in ((a, sa), (b, sb)):  # both sessions still work
            assert peer.send(Message(MsgType.START, 2, {"session": sid, "prompt": [1, 2]})).type == MsgType.RESULT
        assert b.send(Message(MsgType.END, 3, {"session": sb})).type == MsgType.BYE
        assert hello(c).type == MsgType.WELCOME  # room again
    finally:
        for p in (a, b, c):
            p.close()
        proc.stop()


@pytest.mark.timeout(60)
def test_new_session_gives_the_old_ones_cells_back(tiny_dir):
    """`Client.new_session` ENDs the session before it opens the next: at a limit of one session it
    still gets one (the bench relies on it to keep a row's pool free of the other rows' cells)."""
    proc = VerifierProcess(tiny_dir, "--max-sessions", "1")
    try:
        with Client(verifier=proc.endpoint, draft=None, tokenizer=tiny_tokenizer()) as client:
            first, old = client.generate([5, 7, 9], 12).token_ids, client.session
            client.new_session()
            assert client.session != old
            assert client.generate([5, 7, 9], 12).token_ids == first  # the whole prompt prefilled again
    finally:
        proc.stop()


@pytest.mark.timeout(120)
def test_hello_flood_from_one_peer_leaves_others_untouched(tiny_dir, target_lm):
    """One connection opening sessions in a loop hits its own limit; another client generating at the
    same time gets exactly its solo output."""
    proc = VerifierProcess(tiny_dir, "--max-sessions", "8", "--max-sessions-per-peer", "3")
    flooder = RawPeer(proc.endpoint)
    codes, done = [], threading.Event()

    def flood():
        while not done.is_set():
            codes.append(hello(flooder).fields.get("code", "welcome"))

    try:
        with Client(verifier=proc.endpoint, draft=noisy_copy(tiny_target(0, sharpen=30), 0.3), draft_config=CHAIN,
                    timeout_s=30) as client:
            t = threading.Thread(target=flood)
            t.start()
            try:
                out = client.generate([5, 7, 9], 40)
            finally:
                done.set()
                t.join()
        assert out.token_ids == engine_greedy(target_lm, [5, 7, 9], 40)
        assert codes[:3] == ["welcome"] * 3 and set(codes[3:]) == {"busy"} and len(codes) > 3
    finally:
        flooder.close()
        proc.stop()


@pytest.mark.timeout(60)
def test_idle_session_is_reclaimed_and_its_client_resumes(tiny_dir, target_lm):
    proc = VerifierProcess(tiny_dir, "--idle-timeout", "1")
    try:
        with Client(verifier=proc.endpoint, draft=noisy_copy(tiny_target(0, sharpen=30), 0.3), draft_config=CHAIN,
                    timeout_s=30) as client:
            first = client.session
            stream = client.stream([5, 7, 9], 30)
            got = next(stream) + next(stream)
            time.sleep(2.5)  # the verifier closes the session after 1 s unused (checked every 0.2 s)
            for tokens in stream:
                got += tokens
            assert got == engine_greedy(target_lm, [5, 7, 9], 30)
            assert client.session != first  # resumed on a new session
    finally:
        proc.stop()


@pytest.mark.timeout(120)
def test_verifier_killed_mid_generation_is_restarted_and_the_output_is_right(tiny_dir, target_lm):
    """The verifier dies between two steps; `reconnect` restarts it (as `dovetail run` does, once) and
    the client resumes from what was committed: the greedy output is the target's own."""
    proc = VerifierProcess(tiny_dir)
    killed = []

    def reconnect():
        assert proc.proc.poll() is not None, "the old verifier should be dead"
        return proc.restart()

    def kill_once(tokens):
        if not killed:
            killed.append(proc.proc.pid)
            os.kill(proc.proc.pid, signal.SIGKILL)
            proc.proc.wait()

    try:
        with Client(verifier=proc.endpoint, draft=noisy_copy(tiny_target(0, sharpen=30), 0.3), draft_config=CHAIN,
                    timeout_s=30, reconnect=reconnect) as client:
            out = client.generate([5, 7, 9], 40, on_tokens=kill_once)
        assert out.token_ids == engine_greedy(target_lm, [5, 7, 9], 40)
        assert out.stats.resumed == 1 and killed and proc.proc.pid != killed[0]
    finally:
        proc.stop()


@pytest.mark.timeout(120)
def test_draft_process_killed_mid_session_is_reclaimed(tiny_dir, tmp_path):
    """A draft process that dies without END: its session is reclaimed after the idle timeout, so a
    verifier at its limit serves a new client again."""
    import subprocess
    import sys

    proc = VerifierProcess(tiny_dir, "--max-sessions", "1", "--idle-timeout", "2")
    script = tmp_path / "draft.py"
    script.write_text(
        "import sys, time\nsys.path.insert(0, sys.argv[2])\nfrom test_link import RawPeer, open_session\n"
        "from dovetail_rt.protocol import Message, MsgType\n"
        "p = RawPeer(sys.argv[1]); sid = open_session(p)\n"
        "p.send(Message(MsgType.START, 2, {'session': sid, 'prompt': [1, 2, 3]}))\nprint('ready', flush=True)\n"
        "time.sleep(600)\n")
    child = subprocess.Popen([sys.executable, str(script), proc.endpoint, str(Path(__file__).parent)],
                             stdout=subprocess.PIPE, text=True)
    other = RawPeer(proc.endpoint)
    try:
        assert child.stdout.readline().strip() == "ready"
        child.kill()
        child.wait()
        assert hello(other).fields.get("code") == "busy"  # the dead draft's session still holds the one slot
        deadline = time.monotonic() + 10
        while (reply := hello(other)).type != MsgType.WELCOME:
            assert reply.fields["code"] == "busy" and time.monotonic() < deadline, "the dead session was never reclaimed"
            time.sleep(min(reply.fields["retry_after"], 0.5))
    finally:
        other.close()
        child.kill()
        proc.stop()


@pytest.mark.timeout(180)
def test_a_peer_that_stops_reading_stalls_nobody_else(tiny_dir, target_lm):
    """A peer floods requests and never reads a reply: once its queues are full the verifier drops its
    replies instead of waiting on it, and a client generating beside it gets the right output."""
    import zmq

    proc = VerifierProcess(tiny_dir)
    stalled = zmq.Context.instance().socket(zmq.DEALER)
    stalled.setsockopt(zmq.LINGER, 0)
    stalled.setsockopt(zmq.RCVHWM, 1)
    stalled.setsockopt(zmq.RCVBUF, 4096)
    stalled.connect(proc.endpoint)
    bad = [bytes([MsgType.HELLO]), b"\x93\x07\x01\x80"]  # version 7: refused at once, a reply each
    try:
        for _ in range(100_000):  # far more replies than the queues and socket buffers between us hold
            stalled.send_multipart(bad)
        with Client(verifier=proc.endpoint, draft=noisy_copy(tiny_target(0, sharpen=30), 0.3), draft_config=CHAIN,
                    timeout_s=30) as client:
            out = client.generate([5, 7, 9], 30)
        assert out.token_ids == engine_greedy(target_lm, [5, 7, 9], 30)
        assert proc.proc.poll() is None
    finally:
        stalled.close(0)
        proc.stop()
