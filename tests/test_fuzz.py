"""Property-based fuzzing of the wire and of every verifier handler (hypothesis): structurally valid
messages whose fields hold hostile values. Each must get a reply (a result or an ERROR with a code
other than `internal`), never an exception out of the verifier, and a well-behaved session on the
same verifier must go on exactly as before. The longer run against a live verifier is
bench/fuzz_link.py."""

from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from dovetail_rt import lm, protocol
from dovetail_rt.config import VerifierConfig
from dovetail_rt.lm_torch import open_model as open_torch
from dovetail_rt.protocol import Message, MsgType, ProtocolError
from dovetail_rt.verifier import Verifier

from conftest import tiny_target, tiny_tokenizer

VOCAB = [t for t, _ in sorted(tiny_tokenizer().get_vocab().items(), key=lambda kv: kv[1])]
GOOD, HOSTILE = b"good-peer", b"hostile-peer"

ints = st.one_of(st.integers(-(2**63), 2**64 - 1), st.sampled_from([0, -1, 1, 98, 99, 2**31, 2**62, 2**63 - 1, 2**64 - 1]))
scalars = st.one_of(st.none(), st.booleans(), ints, st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e308, -0.0]), st.text(max_size=8),
                    st.binary(max_size=8))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=6), st.dictionaries(st.text(max_size=4), inner, max_size=3)),
                      max_leaves=20)
token_lists = st.one_of(st.lists(ints, max_size=40), st.lists(st.integers(0, 98), min_size=0, max_size=300),
                        st.builds(lambda n: [1] * n, st.sampled_from([129, 511, 600, 5000])), values)
FIELDS = {
    MsgType.HELLO: {"vocab": st.one_of(values, st.just(VOCAB), st.lists(st.text(max_size=3), max_size=120))},
    MsgType.START: {"prompt": token_lists, "temperature": values, "top_k": values, "top_p": values, "seed": values,
                    "features": values},
    MsgType.VERIFY: {"tokens": token_lists, "parents": token_lists},
    MsgType.END: {},
}


def message(mtype, session_choice):
    """A message of ``mtype`` whose fields each are absent, hostile, or (session) another peer's id."""
    field_sets = {k: st.one_of(st.just(None), v) for k, v in FIELDS[mtype].items()}
    return st.fixed_dictionaries({**field_sets, "session": session_choice}).map(
        lambda f: Message(mtype, 7, {k: v for k, v in f.items() if v is not None}))


def engines():
    yield "torch", open_torch("tiny", Path("."), model=tiny_target(0, sharpen=30), tokenizer=tiny_tokenizer())
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return
    import tempfile

    from tiny_gguf import write_gguf

    path = write_gguf(tiny_target(0, sharpen=30), VOCAB, Path(tempfile.mkdtemp()) / "tiny.gguf")
    yield "llamacpp", lm.open_lm(str(path), Path("."), "llamacpp", threads=1, n_ctx=512, sessions=4)


@pytest.fixture(scope="module", params=["torch", "llamacpp"])
def setup(request):
    models = dict(engines())
    if request.param not in models:
        pytest.skip("llama-cpp-python is not installed")
    verifier = Verifier(models[request.param], VerifierConfig(model="tiny", home=Path("."), max_sessions=6,
                                                              max_sessions_per_peer=3))
    good = ask(verifier, GOOD, Message(MsgType.HELLO, 1, {"vocab": VOCAB})).fields["session"]
    expected = steps(verifier, good)
    return verifier, good, expected


def ask(verifier, identity, msg, frames=None) -> Message:
    return verifier.reply_all([(identity, frames or protocol.encode(msg))])[0][1]


def steps(verifier, sid) -> list:
    """A well-behaved generation on session ``sid``: START, then three one-token VERIFYs."""
    out = [ask(verifier, GOOD, Message(MsgType.START, 2, {"session": sid, "prompt": [5, 7, 9]})).fields["bonus"]]
    for _ in range(3):
        out.append(ask(verifier, GOOD, Message(MsgType.VERIFY, 3, {"session": sid, "tokens": [], "parents": []})).fields["bonus"])
    return out


def check_reply(reply: Message):
    assert reply.type in (MsgType.WELCOME, MsgType.RESULT, MsgType.BYE, MsgType.ERROR)
    if reply.type == MsgType.ERROR:
        assert reply.fields["code"] != "internal", reply.fields["message"]


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(frames=st.lists(st.binary(max_size=64), min_size=0, max_size=5))
def test_decode_refuses_garbage_with_protocol_errors_only(frames):
    try:
        protocol.decode(frames)
    except ProtocolError:
        pass


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(version=values, seq=values, fields=values, mtype=st.integers(0, 255),
       tensors=st.lists(st.lists(values, max_size=5), max_size=3))
def test_decode_refuses_hostile_headers_with_protocol_errors_only(version, seq, fields, mtype, tensors):
    if isinstance(fields, dict):
        fields = dict(fields, tensors=tensors)
    try:
        header = msgpack.packb([version, seq, fields])
    except (OverflowError, ValueError, TypeError):
        return
    try:
        protocol.decode([bytes([mtype]), header, b"\x00" * 8])
    except ProtocolError:
        pass


@pytest.mark.timeout(600)
@pytest.mark.parametrize("mtype", [MsgType.HELLO, MsgType.START, MsgType.VERIFY, MsgType.END])
def test_every_handler_survives_hostile_fields_and_disturbs_no_other_session(setup, mtype):
    verifier, good, expected = setup
    hostile = ask(verifier, HOSTILE, Message(MsgType.HELLO, 1, {"vocab": []})).fields["session"]
    ask(verifier, HOSTILE, Message(MsgType.START, 2, {"session": hostile, "prompt": [1, 2]}))

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
    @given(msg=message(mtype, st.one_of(st.just(None), st.just(good), st.just(hostile), ints, values)))
    def hostile_message(msg):
        try:
            frames = protocol.encode(msg)
        except (OverflowError, ValueError, TypeError):  # msgpack cannot even carry it
            return
        check_reply(ask(verifier, HOSTILE, msg, frames))

    hostile_message()
    assert steps(verifier, good) == expected, "the well-behaved session was disturbed"
    for sid in [s.id for s in verifier.sessions.values() if s.identity == HOSTILE]:
        ask(verifier, HOSTILE, Message(MsgType.END, 9, {"session": sid}))
