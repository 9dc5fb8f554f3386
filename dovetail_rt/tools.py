"""Tool calls: OpenAI's ``tools`` / ``tool_choice`` through the target's own chat template, and the
calls it writes parsed back into ``tool_calls``.

The installed targets (Qwen2.5) take tools in their chat template and answer a call as
``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` (the Hermes format, which many
other templates share). ``tool_choice``: ``auto`` (default with tools) leaves the model free;
``none`` leaves the tools out of the prompt; ``required`` and a named function constrain the output
with a grammar (``grammar.compile_grammar``) to one such block whose JSON is a call of one of the
tools (of that one), its arguments valid against the function's parameter schema. Lossless as any
grammar: the target's distribution restricted to what the grammar allows.
"""

from __future__ import annotations

import json
import uuid

from .grammar import JSON_WHITESPACE

OPEN, CLOSE = "<tool_call>", "</tool_call>"


def check(tools: list, choice) -> list[dict]:
    """The functions of ``tools`` (OpenAI's list), checked; ValueError says what is wrong."""
    functions = []
    for i, tool in enumerate(tools or []):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(fn, dict):
            raise ValueError(f"tools[{i}]: only {{'type': 'function', 'function': {{...}}}} tools are supported")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f"tools[{i}].function.name is missing")
        functions.append(fn)
    name = named(choice)
    if name is not None and name not in {fn["name"] for fn in functions}:
        raise ValueError(f"tool_choice names '{name}', which is not among the tools")
    if choice not in (None, "auto", "none", "required") and name is None:
        raise ValueError("tool_choice is 'auto', 'none', 'required' or {'type': 'function', 'function': {'name': ...}}")
    if choice == "required" and not functions:
        raise ValueError("tool_choice 'required' needs tools")
    return functions


def named(choice) -> str | None:
    if isinstance(choice, dict):
        fn = choice.get("function")
        return fn.get("name") if isinstance(fn, dict) else None
    return None


def grammar(functions: list[dict], choice) -> str | None:
    """A Lark grammar (llguidance's, with an inline JSON Schema) for ``required`` or a named function;
    None when the model is free (``auto``, ``none``)."""
    name = named(choice)
    if choice != "required" and name is None:
        return None
    chosen = [fn for fn in functions if name is None or fn["name"] == name]
    calls = [{"type": "object", "properties": {"name": {"const": fn["name"]},
                                               "arguments": fn.get("parameters") or {"type": "object"}},
              "required": ["name", "arguments"], "additionalProperties": False} for fn in chosen]
    schema = {**(calls[0] if len(calls) == 1 else {"anyOf": calls}), "x-guidance": {"whitespace_pattern": JSON_WHITESPACE}}
    return f'start: "{OPEN}\\n" %json {json.dumps(schema)} "\\n{CLOSE}"'


def template_messages(messages: list[dict]) -> list[dict]:
    """OpenAI's messages as chat templates take them: an assistant's ``tool_calls`` with their
    ``arguments`` as objects (OpenAI sends them as JSON text), ``tool`` messages as they are."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            calls = []
            for call in m["tool_calls"]:
                fn = dict(call.get("function") or {})
                if isinstance(fn.get("arguments"), str):
                    try:
                        fn["arguments"] = json.loads(fn["arguments"])
                    except ValueError:
                        pass  # the template shows it as text
                calls.append({**call, "function": fn})
            m["tool_calls"] = calls
        out.append(m)
    return out


def parse(text: str) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of a whole reply: every ``<tool_call>`` block whose JSON has a name
    becomes a call (OpenAI's shape, ``arguments`` as JSON text); the text around them is the content
    (None when only whitespace). A block that is not such JSON stays in the content."""
    calls, content, at = [], [], 0
    while True:
        start = text.find(OPEN, at)
        if start < 0:
            content.append(text[at:])
            break
        end = text.find(CLOSE, start)
        body = text[start + len(OPEN): end if end >= 0 else len(text)]
        try:
            call = json.loads(body)
            if not (isinstance(call, dict) and isinstance(call.get("name"), str)):
                raise ValueError("no name")
        except ValueError:
            content.append(text[at: end + len(CLOSE) if end >= 0 else len(text)])
        else:
            content.append(text[at:start])
            args = call.get("arguments", call.get("parameters", {}))
            calls.append({"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                          "function": {"name": call["name"], "arguments": args if isinstance(args, str) else json.dumps(args)}})
        if end < 0:
            break
        at = end + len(CLOSE)
    joined = "".join(content)
    return (joined if joined.strip() else None), calls


class Holdback:
    """Streamed text with tools: text goes out as it comes until a ``<tool_call>`` could be starting;
    from there on it is held, and ``finish`` parses what was held into calls."""

    def __init__(self):
        self.text, self.sent = "", 0

    def push(self, piece: str) -> str:
        self.text += piece
        start = self.text.find(OPEN, self.sent)
        if start >= 0:
            safe = start
        else:  # a tail that may be the start of OPEN waits
            safe = len(self.text)
            for k in range(min(len(OPEN) - 1, len(self.text) - self.sent), 0, -1):
                if OPEN.startswith(self.text[-k:]):
                    safe = len(self.text) - k
                    break
        out, self.sent = self.text[self.sent: safe], max(self.sent, safe)
        return out

    def finish(self) -> tuple[str, list[dict]]:
        """(the held text that is content, the calls in it)."""
        content, calls = parse(self.text[self.sent:])
        return content or "", calls
