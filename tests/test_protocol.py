"""The wire format: round trips and every refusal."""

import msgpack
import pytest
import torch

from dovetail_rt import protocol
from dovetail_rt.protocol import Message, MsgType, ProtocolError


def roundtrip(msg: Message) -> Message:
    frames = [bytes(f) for f in protocol.encode(msg)]
    return protocol.decode(frames)


def test_roundtrip_bf16_noncontiguous_empty_scalar():
    bf16 = torch.randn(3, 5).to(torch.bfloat16)
    noncontig = torch.arange(24, dtype=torch.float32).view(4, 6).t()  # [6, 4], strided
    empty = torch.empty(0, 7, dtype=torch.float16)
    scalar = torch.tensor(3, dtype=torch.int64)
    msg = Message(MsgType.RESULT, 42, {"accepted": [1, 2], "bonus": 7},
                  {"bf16": bf16, "noncontig": noncontig, "empty": empty, "scalar": scalar})
    out = roundtrip(msg)
    assert out.type == MsgType.RESULT and out.seq == 42 and out.fields == {"accepted": [1, 2], "bonus": 7}
    for name, tensor in msg.tensors.items():
        assert out.tensors[name].dtype == tensor.dtype and out.tensors[name].shape == tensor.shape
        assert torch.equal(out.tensors[name], tensor)


def frames_of(mtype=MsgType.VERIFY, header=None, tensors=()):
    header = header if header is not None else [protocol.PROTOCOL_VERSION, 5, {}]
    return [bytes([mtype]), msgpack.packb(header), *tensors]


@pytest.mark.parametrize("frames, code", [
    ([b"\x04"], "malformed"),  # no header
    ([b"\x63", msgpack.packb([1, 5, {}])], "bad_type"),
    ([b"\x04\x04", msgpack.packb([1, 5, {}])], "malformed"),
    ([b"\x04", b"\xc1not msgpack"], "malformed"),
    ([b"\x04", msgpack.packb({"a": 1})], "malformed"),
    ([b"\x04", msgpack.packb([99, 5, {}])], "version"),
    ([b"\x04", msgpack.packb([1, 5, {"tensors": [["x", "float32", [2, 2], 2]]}]), b"\x00" * 15], "malformed"),
    ([b"\x04", msgpack.packb([1, 5, {"tensors": [["x", "complex", [1], 2]]}]), b"\x00" * 8], "malformed"),
    ([b"\x04", msgpack.packb([1, 5, {"tensors": [["x", "float32", [-1], 2]]}]), b""], "malformed"),
    ([b"\x04", msgpack.packb([1, 5, {"tensors": [["x", "float32", [1], 7]]}]), b"\x00" * 4], "malformed"),
    ([b"\x04", msgpack.packb([1, 5, {}]), b"stray frame"], "malformed"),
])
def test_malformed_frames_refused(frames, code):
    with pytest.raises(ProtocolError) as err:
        protocol.decode(frames)
    assert err.value.code == code


def test_too_large_refused_with_seq():
    frames = [b"\x04", msgpack.packb([1, 9, {"tensors": [["x", "uint8", [4096], 2]]}]), b"\x00" * 4096]
    with pytest.raises(ProtocolError) as err:
        protocol.decode(frames, max_bytes=2048)
    assert err.value.code == "too_large" and err.value.seq == 9


def test_welcome_round_trips_through_the_wire_and_a_bad_field_is_named():
    welcome = protocol.Welcome(session=7, model="m", engine="llamacpp", dtype="Q4_K_M", vocab_size=99, hidden_size=32,
                               eos=(2, 5), max_positions=512, max_draft_tokens=64, trees=True, features=False,
                               verify_curve={1: 0.02, 8: 0.05})
    back = protocol.Welcome.decode(protocol.decode(protocol.encode(welcome.message())))
    assert back == welcome and back.context_limit(300) == 300 and back.context_limit(4096) == 512
    fields = welcome.message().fields
    for key, bad in (("eos", "2"), ("trees", 1), ("max_positions", 0), ("verify_curve", {"x": 1.0})):
        with pytest.raises(ProtocolError, match=key):
            protocol.Welcome.decode(Message(MsgType.WELCOME, fields={**fields, key: bad}))
