"""Wire messages between the draft side and the verifier. No sockets, no models, no pickle.

A message is a list of ZeroMQ frames:

    frame 0   1 byte: the message type (``MsgType``)
    frame 1   msgpack header: ``[version, seq, fields]``; ``fields`` is a map of plain values
              (ints, floats, strings, lists) plus ``"tensors": [[name, dtype, shape, frame], ...]``
    frame 2+  raw tensor bytes, C order, little endian, one frame per tensor

Tensors are decoded with ``torch.frombuffer(...).view(dtype).view(shape)`` (bfloat16-safe).
``decode`` checks everything it can without knowing the model: type, version, header shape,
dtypes, shapes against byte counts, frame indices, total size.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import msgpack
import torch

from .config import DEFAULT_MAX_MESSAGE_BYTES

PROTOCOL_VERSION = 1


class MsgType(enum.IntEnum):
    HELLO = 1  # draft -> verifier: open a session (tokenizer check)
    WELCOME = 2  # verifier -> draft: session id and target facts
    START = 3  # draft -> verifier: new generation: prompt ids + sampling settings -> prefill
    VERIFY = 4  # draft -> verifier: draft tokens + parents (a chain or a tree)
    RESULT = 5  # verifier -> draft: accepted tokens, bonus token, optional features
    END = 6  # draft -> verifier: close the session
    ERROR = 7  # verifier -> draft: a request was refused; the session (if any) lives on
    BYE = 8  # verifier -> draft: session closed


_DTYPES = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "uint8": torch.uint8, "bool": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


class ProtocolError(ValueError):
    """A message that cannot be decoded; ``code`` is sent back in the ERROR reply."""

    def __init__(self, message: str, code: str = "malformed", **fields):
        super().__init__(message)
        self.code = code
        self.seq = 0
        self.fields = fields  # more fields for the ERROR reply (``retry_after`` with ``busy``)


@dataclass
class Message:
    type: MsgType
    seq: int = 0
    fields: dict = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


def encode(msg: Message) -> list[bytes | memoryview]:
    """Message -> frames. Tensors go out as raw bytes (made contiguous, moved to the CPU)."""
    specs, frames = [], []
    for name, tensor in msg.tensors.items():
        if tensor.dtype not in _DTYPE_NAMES:
            raise ValueError(f"tensor '{name}' has dtype {tensor.dtype}, which the protocol does not carry")
        t = tensor.detach().to("cpu").contiguous()
        specs.append([name, _DTYPE_NAMES[t.dtype], list(t.shape), 2 + len(frames)])
        frames.append(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    header = dict(msg.fields)
    if specs:
        header["tensors"] = specs
    return [bytes([int(msg.type)]), msgpack.packb([PROTOCOL_VERSION, msg.seq, header]), *frames]


def decode(frames: list, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Message:
    """Frames -> Message, or ProtocolError saying what was wrong (with the seq when known)."""
    frames = [f.buffer if hasattr(f, "buffer") else f for f in frames]
    if len(frames) < 2:
        raise ProtocolError(f"a message needs at least 2 frames (type, header), got {len(frames)}")
    seq = 0
    try:
        version, seq, fields = _decode_header(frames[1], max_bytes)
        total = sum(len(f) for f in frames)
        if total > max_bytes:
            raise ProtocolError(f"message of {total} bytes exceeds the limit of {max_bytes} bytes", "too_large")
        if len(frames[0]) != 1:
            raise ProtocolError(f"frame 0 must be 1 byte (the message type), got {len(frames[0])} bytes")
        try:
            mtype = MsgType(frames[0][0])
        except ValueError:
            raise ProtocolError(f"unknown message type {frames[0][0]}", "bad_type") from None
        if version != PROTOCOL_VERSION:
            raise ProtocolError(
                f"protocol version {version} is not supported (this side speaks version {PROTOCOL_VERSION}); "
                "install the same dovetail_rt version on both hosts", "version",
            )
        tensors = {}
        for spec in fields.pop("tensors", []) or []:
            name, tensor = _decode_tensor(spec, frames)
            tensors[name] = tensor
        if len(frames) != 2 + len(tensors):
            raise ProtocolError(f"{len(frames) - 2} tensor frames but {len(tensors)} tensors described")
    except ProtocolError as exc:
        exc.seq = seq
        raise
    return Message(mtype, seq, fields, tensors)


def _decode_header(buf, max_bytes: int) -> tuple[int, int, dict]:
    if len(buf) > max_bytes:
        raise ProtocolError(f"header of {len(buf)} bytes exceeds the limit of {max_bytes} bytes", "too_large")
    try:
        header = msgpack.unpackb(buf, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"header is not valid msgpack: {exc}") from None
    if not (isinstance(header, list) and len(header) == 3 and isinstance(header[2], dict)):
        raise ProtocolError("header must be [version, seq, {fields}]")
    version, seq, fields = header
    if not isinstance(seq, int) or isinstance(seq, bool):
        raise ProtocolError("seq must be an integer")
    if not isinstance(fields.get("tensors", []), list):
        raise ProtocolError("'tensors' must be a list of tensor specs")
    return version, seq, fields


def _decode_tensor(spec, frames) -> tuple[str, torch.Tensor]:
    if not (isinstance(spec, list) and len(spec) == 4):
        raise ProtocolError(f"tensor spec must be [name, dtype, shape, frame], got {spec!r}")
    name, dtype_name, shape, index = spec
    if dtype_name not in _DTYPES:
        raise ProtocolError(f"tensor '{name}': unknown dtype {dtype_name!r}")
    if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)):
        raise ProtocolError(f"tensor '{name}': bad shape {shape!r}")
    if not (isinstance(index, int) and 2 <= index < len(frames)):
        raise ProtocolError(f"tensor '{name}': frame index {index!r} out of range")
    dtype = _DTYPES[dtype_name]
    numel = 1
    for s in shape:
        numel *= s
    buf = frames[index]
    expected = numel * dtype.itemsize
    if len(buf) != expected:
        raise ProtocolError(f"tensor '{name}': shape {shape} {dtype_name} needs {expected} bytes, frame has {len(buf)}")
    if numel == 0:
        return name, torch.empty(shape, dtype=dtype)
    raw = torch.frombuffer(bytearray(buf), dtype=torch.uint8)
    return name, raw.view(dtype).view(shape)


# ---- typed field access: every field a handler reads goes through these ----

def get_int(msg: Message, key: str, lo: int | None = None, hi: int | None = None, default=None) -> int:
    value = msg.fields.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError(f"field '{key}' must be an integer, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ProtocolError(f"field '{key}' = {value} is out of range [{lo}, {hi}]", "out_of_range")
    return value


def get_float(msg: Message, key: str, lo: float, hi: float, default=None) -> float:
    value = msg.fields.get(key, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not lo <= value <= hi:
        raise ProtocolError(f"field '{key}' must be a number in [{lo}, {hi}], got {value!r}", "out_of_range")
    return float(value)


def get_int_list(msg: Message, key: str, lo: int, hi: int, max_len: int) -> list[int]:
    value = msg.fields.get(key)
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ProtocolError(f"field '{key}' must be a list of integers")
    if len(value) > max_len:
        raise ProtocolError(f"field '{key}' has {len(value)} entries, more than the limit {max_len}", "out_of_range")
    bad = next((v for v in value if not lo <= v <= hi), None)
    if bad is not None:
        raise ProtocolError(f"field '{key}' holds {bad}, outside [{lo}, {hi}]", "out_of_range")
    return value


def error(seq: int, code: str, text: str, session: int | None = None, **extra) -> Message:
    fields = {"code": code, "message": text, **extra}
    if session is not None:
        fields["session"] = session
    return Message(MsgType.ERROR, seq, fields)


def internal_error(seq: int, exc: Exception) -> Message:
    """The ``internal`` ERROR for a request that failed inside the verifier (the one place it is built)."""
    return error(seq, "internal", f"{type(exc).__name__}: {exc}")


@dataclass(frozen=True)
class Welcome:
    """WELCOME's fields, typed: built by the verifier, decoded once by the client. What the draft side
    knows of the target: its model, sizes and EOS ids, its engine's capabilities, the limits per
    session and per VERIFY, and the verification curve measured on the verifier's machine."""

    session: int
    model: str
    engine: str  # "torch" or "llamacpp"
    dtype: str  # the target's weight format ("float32", "Q4_K_M", ...)
    vocab_size: int
    hidden_size: int
    eos: tuple[int, ...]
    max_positions: int  # the most tokens one session holds (prompt + output)
    max_draft_tokens: int  # per VERIFY
    trees: bool = True  # the engine verifies trees, not only chains
    features: bool = True  # the engine returns last-layer hidden states (a draft head needs them)
    verify_curve: dict = field(default_factory=dict)  # {q: seconds}: T_V measured there ({} if none)

    def message(self) -> Message:
        return Message(MsgType.WELCOME, fields={
            "session": self.session, "model": self.model, "engine": self.engine, "dtype": self.dtype,
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size, "eos": list(self.eos),
            "max_positions": self.max_positions, "max_draft_tokens": self.max_draft_tokens, "trees": self.trees,
            "features": self.features, "verify_curve": {str(q): t for q, t in self.verify_curve.items()}})

    @classmethod
    def decode(cls, msg: Message) -> "Welcome":
        """The typed WELCOME, or a ProtocolError that names the field that is missing or wrong."""
        f = msg.fields
        for key, kind in (("model", str), ("engine", str), ("dtype", str), ("trees", bool), ("features", bool)):
            if not isinstance(f.get(key), kind):
                raise ProtocolError(f"WELCOME field '{key}' must be a {kind.__name__}, got {f.get(key)!r}")
        curve = f.get("verify_curve", {})
        if not isinstance(curve, dict) or not all(isinstance(t, (int, float)) for t in curve.values()):
            raise ProtocolError(f"WELCOME field 'verify_curve' must map q to seconds, got {curve!r}")
        try:
            curve = {int(q): float(t) for q, t in curve.items()}
        except ValueError as exc:
            raise ProtocolError(f"WELCOME field 'verify_curve' has a q that is not an integer: {exc}") from exc
        eos = f.get("eos")
        if not isinstance(eos, list) or not all(isinstance(e, int) and not isinstance(e, bool) for e in eos):
            raise ProtocolError(f"WELCOME field 'eos' must be a list of token ids, got {eos!r}")
        return cls(session=get_int(msg, "session", 0), model=f["model"], engine=f["engine"], dtype=f["dtype"],
                   vocab_size=get_int(msg, "vocab_size", 1), hidden_size=get_int(msg, "hidden_size", 0),
                   eos=tuple(eos), max_positions=get_int(msg, "max_positions", 1),
                   max_draft_tokens=get_int(msg, "max_draft_tokens", 1), trees=f["trees"], features=f["features"],
                   verify_curve=curve)

    def context_limit(self, draft_positions: int) -> int:
        """The most tokens a generation may hold (prompt + output): the verifier's per-session limit and
        the draft's own, whichever is smaller (one place for the client and the server)."""
        return min(self.max_positions, draft_positions)
