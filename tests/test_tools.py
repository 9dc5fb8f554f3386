"""Tool calls (issue 20 item 5): the checks, the grammar tool_choice asks for, parsing a reply's
calls, and holding a call's text back while streaming (the server and the real model: test_server.py,
test_real_model.py)."""

import json

import pytest

from dovetail_rt import grammar, openai_api, tools

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "the weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


def test_a_reply_is_split_into_content_and_calls():
    text = 'Let me look.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    content, calls = tools.parse(text)
    assert content == "Let me look." and len(calls) == 1
    assert calls[0]["type"] == "function" and calls[0]["id"].startswith("call_")
    assert calls[0]["function"]["name"] == "get_weather" and json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}
    two = text + '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    assert [c["function"]["name"] for c in tools.parse(two)[1]] == ["get_weather", "get_time"]
    assert tools.parse("<tool_call>not json</tool_call> ok") == ("<tool_call>not json</tool_call> ok", [])
    assert tools.parse("plain") == ("plain", [])


def test_streamed_text_is_held_from_where_a_call_may_start():
    held = tools.Holdback()
    pieces = ["Hi <to", "ol_", "call>\n{\"name\": \"get_time\", ", "\"arguments\": {}}\n</tool_call>"]
    assert [held.push(p) for p in pieces] == ["Hi ", "", "", ""]
    rest, calls = held.finish()
    assert rest == "" and calls[0]["function"]["name"] == "get_time"
    plain = tools.Holdback()
    assert "".join(plain.push(p) for p in ["a <b", "> c"]) + plain.finish()[0] == "a <b> c"


@pytest.mark.parametrize("choice, names", [("required", {"get_weather", "get_time"}),
                                           ({"type": "function", "function": {"name": "get_time"}}, {"get_time"})])
def test_required_and_named_choices_are_grammars_for_those_calls(choice, names):
    """The grammar compiles, and a matcher over a byte-level vocabulary of the call's own characters accepts
    a valid call of the allowed functions and refuses another."""
    g = tools.grammar(tools.check([WEATHER, TIME], choice), choice)
    compiled = grammar.compile_grammar("lark", g)
    calls = {"get_weather": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
             "get_time": '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'}
    vocab = sorted(set("".join(calls.values())))  # one token per character
    for name, call in calls.items():
        c = grammar.Grammars(vocab, len(vocab), []).constraint(compiled)
        ids = [vocab.index(ch) for ch in call]
        assert (c.matcher.validate_tokens(ids) == len(ids)) == (name in names), name


def test_what_the_checks_refuse():
    with pytest.raises(ValueError, match="not among the tools"):
        tools.check([WEATHER], {"type": "function", "function": {"name": "nope"}})
    with pytest.raises(ValueError, match="needs tools"):
        tools.check([], "required")
    with pytest.raises(ValueError, match="only"):
        tools.check([{"type": "retrieval"}], "auto")
    with pytest.raises(ValueError, match="tool_choice is"):
        tools.check([WEATHER], "sometimes")
    assert tools.grammar(tools.check([WEATHER], "auto"), "auto") is None


def test_an_assistant_call_goes_back_to_the_template_with_object_arguments():
    req = openai_api.ChatRequest(messages=[
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C"}], tools=[WEATHER])
    messages = tools.template_messages([m.template() for m in req.messages])
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert messages[2] == {"role": "tool", "content": "18 C", "tool_call_id": "call_1"}
    assert req.template_tools() == [WEATHER] and req.tool_constraint() == []
    none = openai_api.ChatRequest(messages=[{"role": "user", "content": "x"}], tools=[WEATHER], tool_choice="none")
    assert none.template_tools() is None
