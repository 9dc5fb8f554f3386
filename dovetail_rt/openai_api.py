"""The OpenAI-compatible wire format of `dovetail serve`: request models, response bodies, errors.

Field names and codes follow OpenAI's API as llama.cpp's server and vLLM implement it; llama.cpp's
per-request ``speculative`` object and its ``timings`` block are kept too. No sockets, no models.
"""

from __future__ import annotations

import json
import time
import uuid

from pydantic import BaseModel, ConfigDict, Field, field_validator


UNSUPPORTED = {  # fields clients send at their neutral value by default; any other value is refused
    "presence_penalty": "penalties are not supported (they would change the target's distribution)",
    "frequency_penalty": "penalties are not supported (they would change the target's distribution)",
    "logprobs": "logprobs are not supported",
    "echo": "echo is not supported",
}


def refuse_if_set(value, info):
    if value:
        raise ValueError(UNSUPPORTED[info.field_name])
    return value


class Speculative(BaseModel):
    """llama.cpp's per-request speculation settings: ``n_max`` 0 turns drafting off."""

    model_config = ConfigDict(extra="forbid")
    n_max: int | None = Field(default=None, ge=0, le=128)
    n_min: int | None = Field(default=None, ge=0, le=128)
    p_min: float | None = Field(default=None, ge=0.0, le=1.0)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: str
    content: str | list[dict] | None = None
    name: str | None = None

    def text(self) -> str:
        """The message's text; content parts other than text are refused."""
        if isinstance(self.content, list):
            parts = []
            for part in self.content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(f"content parts of type '{part.get('type')}' are not supported: text only")
                parts.append(part["text"])
            return "".join(parts)
        return self.content or ""


class Sampling(BaseModel):
    """What both endpoints take. Unknown fields are refused with a 400 that names them."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    seed: int | None = Field(default=None, ge=0, lt=1 << 63)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    speculative: Speculative | None = None
    n: int = 1
    user: str | None = None
    # accepted at their neutral values only (clients send them by default)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool | int | None = None

    @field_validator("n")
    @classmethod
    def one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n = 1 is supported (one choice per request)")
        return n

    @field_validator("presence_penalty", "frequency_penalty", "logprobs")
    @classmethod
    def neutral(cls, v, info):
        return refuse_if_set(v, info)

    @field_validator("stop")
    @classmethod
    def few_stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 16 or any(not s for s in stops):
            raise ValueError("stop: at most 16 non-empty strings")
        return v

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(Sampling):
    prompt: str | list[int] = Field(min_length=1)
    echo: bool = False

    @field_validator("echo")
    @classmethod
    def neutral(cls, v, info):
        return refuse_if_set(v, info)

    def limit(self) -> int | None:
        return self.max_tokens or 16  # OpenAI's default for completions


def error(message: str, kind: str = "invalid_request_error", code: int | str = 400, param: str | None = None) -> dict:
    """An OpenAI error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """Pydantic's errors -> one message that names the fields, and the first field."""
    parts, first = [], None
    for e in errors:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        field = ".".join(loc) or "body"
        first = first or field
        msg = "is not a supported field" if e.get("type") == "extra_forbidden" else e.get("msg", "is invalid")
        parts.append(f"'{field}' {msg.removeprefix('Value error, ')}")
    return "; ".join(parts), first


def timings(stats) -> dict:
    """llama.cpp's timings block (and tau) from a GenerationStats."""
    decode_s = max(stats.seconds - stats.timings.prefill_s, 0.0)
    n_decoded = max(stats.n_generated - 1, 0)  # the prefill gives the first token
    return {"prompt_n": stats.n_prompt, "prompt_ms": round(1000 * stats.timings.prefill_s, 3),
            "prompt_per_second": stats.n_prompt / stats.timings.prefill_s if stats.timings.prefill_s else 0.0,
            "predicted_n": stats.n_generated, "predicted_ms": round(1000 * decode_s, 3),
            "predicted_per_second": n_decoded / decode_s if decode_s > 0 else 0.0,
            "draft_n": stats.n_drafted, "draft_n_accepted": stats.n_accepted, "tau": round(stats.tau, 4)}


def usage(stats) -> dict:
    return {"prompt_tokens": stats.n_prompt, "completion_tokens": stats.n_generated,
            "total_tokens": stats.n_prompt + stats.n_generated}


class Reply:
    """The bodies of one response, chat or completion, whole or as stream chunks."""

    def __init__(self, chat: bool, model: str):
        self.chat, self.model = chat, model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def whole(self, text: str, finish: str, stats) -> dict:
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish}
                  if self.chat else {"index": 0, "text": text, "logprobs": None, "finish_reason": finish})
        return {**self._head(self.object), "choices": [choice], "usage": usage(stats), "timings": timings(stats)}

    def chunk(self, text: str | None = None, finish: str | None = None, first: bool = False, stats=None) -> str:
        """One SSE event; ``stats``: the final chunk's timings."""
        if self.chat:
            delta = ({"role": "assistant", "content": text or ""} if first else {} if text is None else {"content": text})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            body = {**self._head("chat.completion.chunk"), "choices": [choice]}
        else:
            body = {**self._head("text_completion"), "choices": [{"index": 0, "text": text or "", "logprobs": None,
                                                                   "finish_reason": finish}]}
        if stats is not None:
            body["timings"] = timings(stats)
        return sse(body)

    def usage_chunk(self, stats) -> str:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return sse({**self._head(obj), "choices": [], "usage": usage(stats), "timings": timings(stats)})


def sse(body: dict) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


DONE = "data: [DONE]\n\n"


class StopFinder:
    """Text out as it comes, cut at the first stop string; holds back a tail that could be the start
    of one, so a stop string never reaches the client, even split across tokens."""

    def __init__(self, stops: list[str]):
        self.stops, self.hold = stops, max((len(s) for s in stops), default=1) - 1
        self.text, self.sent = "", 0
        self.stopped = False

    def push(self, new: str) -> str:
        """Newly safe text; sets ``stopped`` when a stop string appeared."""
        self.text += new
        at = min((i for i in (self.text.find(s, max(self.sent - self.hold, 0)) for s in self.stops) if i >= 0), default=-1)
        if at >= 0:
            self.stopped, out = True, self.text[self.sent:at]
            self.text, self.sent = self.text[:at], at
            return out
        safe = max(len(self.text) - self.hold, self.sent)
        out, self.sent = self.text[self.sent:safe], safe
        return out

    def flush(self) -> str:
        out, self.sent = self.text[self.sent:], len(self.text)
        return out
