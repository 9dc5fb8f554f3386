"""The OpenAI-compatible wire format of `dovetail serve`: request models, response bodies, errors.

Field names and codes follow OpenAI's API as llama.cpp's server and vLLM implement it; llama.cpp's
per-request ``speculative`` object and its ``timings`` block are kept too. No sockets, no models.
"""

from __future__ import annotations

import json
import logging
import time
import uuid

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from . import tools
from .sampling import MAX_TOP_LOGPROBS


log = logging.getLogger(__name__)

UNSUPPORTED = {  # fields clients send at their neutral value by default; any other value is refused
    "presence_penalty": "penalties are not supported (they would change the target's distribution)",
    "frequency_penalty": "penalties are not supported (they would change the target's distribution)",
    "echo": "echo is not supported",
    "tools": "tools are a chat feature: send them to /v1/chat/completions",
    "tool_choice": "tool_choice is a chat feature: send it to /v1/chat/completions",
}
_ignored: set[str] = set()  # unknown field names already logged (once per name per process)


def refuse_if_set(value, info):
    neutral = value in (None, False, 0, [], {}, "", "none", "auto") or value == {"type": "text"}
    if not neutral:
        raise ValueError(UNSUPPORTED[info.field_name])
    return value


class Lenient(BaseModel):
    """A request part that ignores the fields it does not know, as llama.cpp's server and vLLM do
    (clients send their own extras: ``timings_per_token``, ``id_slot``, ``return_tokens``, ...); each
    unknown name is logged once. Known fields with values we cannot honour are refused by name."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="after")
    def _drop_unknown(self):
        for name in list(self.model_extra or {}):
            if name not in _ignored:
                _ignored.add(name)
                log.info("ignoring the request field '%s' (not used by dovetail serve)", name)
            del self.model_extra[name]
        return self


class Speculative(Lenient):
    """llama.cpp's per-request speculation settings: ``n_max`` 0 turns drafting off."""

    n_max: int | None = Field(default=None, ge=0, le=128)
    n_min: int | None = Field(default=None, ge=0, le=128)
    p_min: float | None = Field(default=None, ge=0.0, le=1.0)


class StreamOptions(Lenient):
    include_usage: bool = False


class Message(Lenient):
    role: str
    content: str | list[dict] | None = None
    name: str | None = None
    tool_calls: list[dict] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers

    def template(self) -> dict:
        """The message as a chat template takes it."""
        m = {"role": self.role, "content": self.text()}
        for key in ("name", "tool_calls", "tool_call_id"):
            if getattr(self, key) is not None:
                m[key] = getattr(self, key)
        return m

    def text(self) -> str:
        """The message's text; text parts are joined with newlines (as llama.cpp and vLLM do); parts of
        other types are refused."""
        if isinstance(self.content, list):
            parts = []
            for part in self.content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(f"content parts of type '{part.get('type')}' are not supported: text only")
                parts.append(part["text"])
            return "\n".join(parts)
        return self.content or ""


class Sampling(Lenient):
    """What both endpoints take. Unknown fields are ignored; known ones we cannot honour are a 400."""

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    n_predict: int | None = Field(default=None, ge=-1)  # llama.cpp's name for max_tokens (-1: no limit)
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
    logprobs: bool | int | None = None  # chat: a bool (with top_logprobs); completions: the number of alternatives
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: dict | None = None
    grammar: str | None = None
    json_schema: dict | None = None

    @field_validator("n")
    @classmethod
    def one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n = 1 is supported (one choice per request)")
        return n

    @field_validator("presence_penalty", "frequency_penalty")
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

    def constraint(self) -> tuple[str, str, object] | None:
        """(field, grammar format, text) of the structured output asked for: OpenAI's
        ``response_format`` (json_object, json_schema) or llama.cpp's ``json_schema`` / ``grammar``
        (GBNF); None for plain text. More than one, or a type we do not know, is a ValueError."""
        asked = []
        rf = self.response_format
        if rf and rf.get("type", "text") != "text":
            kind = rf.get("type")
            if kind == "json_object":  # llama.cpp also takes a schema here
                asked.append(("response_format", "json_schema", rf["schema"]) if rf.get("schema")
                             else ("response_format", "json_object", ""))
            elif kind == "json_schema":
                spec = rf.get("json_schema") or {}
                schema = spec.get("schema") if isinstance(spec, dict) else None
                if schema is None:
                    raise ValueError("response_format json_schema needs json_schema.schema (a JSON Schema object)")
                asked.append(("response_format", "json_schema", schema))
            else:
                raise ValueError(f"response_format type '{kind}' is not supported (text, json_object, json_schema)")
        if self.json_schema:
            asked.append(("json_schema", "json_schema", self.json_schema))
        if self.grammar:
            asked.append(("grammar", "gbnf", self.grammar))
        asked += self.tool_constraint()
        if len(asked) > 1:
            raise ValueError(f"give one of response_format, json_schema, grammar (got {', '.join(a[0] for a in asked)})")
        return asked[0] if asked else None

    def tool_constraint(self) -> list[tuple[str, str, str]]:
        """The grammar tool_choice asks for (chat only)."""
        return []

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def asked_tokens(self) -> int | None:
        """max_tokens, else llama.cpp's n_predict (-1 or absent: none)."""
        return self.max_tokens or (self.n_predict if self.n_predict and self.n_predict > 0 else None)


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list | None = None
    tool_choice: str | dict | None = None

    @model_validator(mode="after")
    def _tools_make_sense(self):
        tools.check(self.tools, self.tool_choice)
        return self

    def template_tools(self) -> list | None:
        """The tools the chat template shows the model (none with tool_choice 'none')."""
        return None if not self.tools or self.tool_choice == "none" else self.tools

    def tool_constraint(self) -> list[tuple[str, str, str]]:
        g = tools.grammar(tools.check(self.tools, self.tool_choice), self.tool_choice) if self.template_tools() else None
        return [("tool_choice", "lark", g)] if g else []

    @model_validator(mode="after")
    def _logprobs_asked(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.logprobs is not None and not isinstance(self.logprobs, bool):
            raise ValueError("logprobs is true or false in chat (the number of alternatives is top_logprobs)")
        return self

    def asked_logprobs(self) -> int | None:
        """How many alternatives per token the verifier sends (None: no logprobs)."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def limit(self) -> int | None:
        return self.max_completion_tokens or self.asked_tokens()


class CompletionRequest(Sampling):
    prompt: str | list[int] = Field(min_length=1)
    echo: bool = False
    tools: list | None = None  # refused when set: a chat feature
    tool_choice: str | dict | None = None

    @field_validator("tools", "tool_choice")
    @classmethod
    def chat_only(cls, v, info):
        return refuse_if_set(v, info)

    def template_tools(self) -> None:
        return None

    @field_validator("logprobs")
    @classmethod
    def alternatives(cls, v):
        if v is not None and (isinstance(v, bool) or not 0 <= v <= MAX_TOP_LOGPROBS):
            raise ValueError(f"logprobs is the number of alternatives per token, 0..{MAX_TOP_LOGPROBS}")
        return v

    def asked_logprobs(self) -> int | None:
        return self.logprobs

    @field_validator("echo")  # its own name: a validator named like Sampling's would replace that one
    @classmethod
    def no_echo(cls, v, info):
        return refuse_if_set(v, info)

    def limit(self) -> int | None:
        if self.n_predict == -1 and not self.max_tokens:
            return None  # llama.cpp's "until the context is full"
        return self.asked_tokens() or 16  # OpenAI's default for completions


def error(message: str, kind: str = "invalid_request_error", code: int | str = 400, param: str | None = None,
          **extra) -> dict:
    """An OpenAI error object (``extra``: llama.cpp's additions, e.g. ``n_prompt_tokens`` and ``n_ctx``)."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code, **extra}}


class ContextOverflow(ValueError):
    """A prompt that leaves no room to generate: OpenAI's code, llama.cpp's two numbers."""

    def __init__(self, n_prompt: int, n_ctx: int):
        super().__init__(f"the prompt has {n_prompt} tokens and the context holds {n_ctx}: shorten it "
                         "(or start the server with a larger -c)")
        self.n_prompt, self.n_ctx = n_prompt, n_ctx

    def body(self, param: str) -> dict:
        return error(str(self), code="context_length_exceeded", param=param, n_prompt_tokens=self.n_prompt,
                     n_ctx=self.n_ctx)


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
    prefilled = stats.n_prompt - stats.n_cached  # llama.cpp's prompt_n: the tokens processed, cache_n: reused
    return {"prompt_n": prefilled, "prompt_ms": round(1000 * stats.timings.prefill_s, 3),
            "prompt_per_second": prefilled / stats.timings.prefill_s if stats.timings.prefill_s else 0.0,
            "predicted_n": stats.n_generated, "predicted_ms": round(1000 * decode_s, 3),
            "predicted_per_second": n_decoded / decode_s if decode_s > 0 else 0.0,
            "draft_n": stats.n_drafted, "draft_n_accepted": stats.n_accepted, "tau": round(stats.tau, 4),
            "cache_n": stats.n_cached}


def usage(stats) -> dict:
    """OpenAI's usage block; ``cached_tokens``: the prompt's prefix the verifier's prefix cache held."""
    return {"prompt_tokens": stats.n_prompt, "completion_tokens": stats.n_generated,
            "total_tokens": stats.n_prompt + stats.n_generated,
            "prompt_tokens_details": {"cached_tokens": stats.n_cached}}


def fingerprint(*parts: str) -> str:
    """``system_fingerprint``: what served the request (our version, the target, its engine and format);
    the same configuration always gives the same one."""
    import hashlib

    from . import __version__

    return "fp_" + hashlib.sha256("|".join((__version__, *parts)).encode()).hexdigest()[:12]


class Reply:
    """The bodies of one response, chat or completion, whole or as stream chunks."""

    def __init__(self, chat: bool, model: str, system_fingerprint: str = ""):
        self.chat, self.model, self.system_fingerprint = chat, model, system_fingerprint
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": self.system_fingerprint}

    def logprobs(self, entries, offset: int = 0) -> dict | None:
        """OpenAI's logprobs block for ``entries`` [(token text, logprob, [(text, logprob) alternatives])]:
        chat ``{"content": [...]}``, completions ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}``
        (``offset``: where the first token's text starts in the choice's text). None: none asked."""
        if entries is None:
            return None
        if self.chat:
            def one(text, lp):
                return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

            return {"content": [{**one(text, lp), "top_logprobs": [one(t, v) for t, v in top]}
                                for text, lp, top in entries], "refusal": None}
        offsets, at = [], offset
        for text, _, _ in entries:
            offsets.append(at)
            at += len(text)
        return {"tokens": [text for text, _, _ in entries], "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [dict(top) for _, _, top in entries], "text_offset": offsets}

    def whole(self, text: str | None, finish: str, stats, logprobs=None, tool_calls: list | None = None) -> dict:
        """``tool_calls``: the calls parsed from the reply (finish_reason then ``tool_calls``)."""
        lp = self.logprobs(logprobs)
        message = {"role": "assistant", "content": text}
        if tool_calls:
            message["tool_calls"], finish = tool_calls, "tool_calls"
        choice = ({"index": 0, "message": message, "logprobs": lp, "finish_reason": finish}
                  if self.chat else {"index": 0, "text": text, "logprobs": lp, "finish_reason": finish})
        return {**self._head(self.object), "choices": [choice], "usage": usage(stats), "timings": timings(stats)}

    def chunk(self, text: str | None = None, finish: str | None = None, first: bool = False, stats=None,
              logprobs=None, offset: int = 0, tool_calls: list | None = None) -> str:
        """One SSE event; ``stats``: the final chunk's timings; ``logprobs``: the entries of the tokens
        that came with this chunk; ``tool_calls``: whole calls, each with its index (OpenAI's delta)."""
        lp = self.logprobs(logprobs, offset)
        if self.chat:
            delta = ({"role": "assistant", "content": text or ""} if first else {} if text is None else {"content": text})
            if tool_calls:
                delta = {"tool_calls": [{"index": i, **call} for i, call in enumerate(tool_calls)]}
            choice = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}
            body = {**self._head("chat.completion.chunk"), "choices": [choice]}
        else:
            body = {**self._head("text_completion"), "choices": [{"index": 0, "text": text or "", "logprobs": lp,
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
