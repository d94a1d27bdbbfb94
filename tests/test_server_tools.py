"""Tool call parsers on their own: a stream cut anywhere gives what the whole text gives."""

from __future__ import annotations

import json

import pytest

from martlet.server.tool_calls import CallArrayParser, HermesParser, Llama3JsonParser, NamedCallParser, auto_parser

HERMES = ('Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
          '<tool_call>{"name": "get_time", "arguments": {"zone": "CET"}}</tool_call> Done <tool')
LLAMA = '{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "parameters": {"zone": "CET"}}'
ARRAY = ('[{"name": "get_weather", "parameters": {"city": "Paris"}}, '
         '{"name": "get_time", "parameters": {"zone": "CET"}}]')
CALLS = [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})]


def _run(parser, pieces: list[str]) -> tuple[str, list[tuple[str, dict]], list]:
    content, deltas = "", []
    for piece in pieces:
        parsed = parser.feed(piece)
        content += parsed.content
        deltas += parsed.tool_calls
    rest = parser.finish()
    content += rest.content
    deltas += rest.tool_calls
    return content, [(c.function.name, json.loads(c.function.arguments)) for c in parser.calls], deltas


@pytest.mark.parametrize("make, text, content", [
    (HermesParser, HERMES, "Let me check.  Done <tool"),
    (Llama3JsonParser, LLAMA, ""),
    (CallArrayParser, ARRAY, ""),
])
def test_streamed_in_any_pieces_equals_whole(make, text, content):
    whole = _run(make(), [text])
    assert whole[0] == content and whole[1] == CALLS
    for size in (1, 3, 7):
        streamed = _run(make(), [text[i : i + size] for i in range(0, len(text), size)])
        assert streamed[:2] == whole[:2]
        assert [d.index for d in streamed[2]] == [0, 1] and all(d.id.startswith("call_") for d in streamed[2])


def test_text_that_is_not_a_call_is_content():
    assert _run(Llama3JsonParser(), ["Paris is ", "sunny."])[:2] == ("Paris is sunny.", [])
    assert _run(Llama3JsonParser(), ['{"city": ', '"Paris"}'])[:2] == ('{"city": "Paris"}', [])
    assert _run(HermesParser(), ["<tool_call>not json</tool_call>"])[:2] == ("<tool_call>not json</tool_call>", [])


def test_named_call_streams_its_arguments():
    parser = NamedCallParser("get_weather")
    deltas = [d for piece in ('{"city"', ': "Pa', 'ris"}') for d in parser.feed(piece).tool_calls]
    assert deltas[0].function.name == "get_weather" and deltas[0].id.startswith("call_")
    assert "".join(d.function.arguments for d in deltas) == '{"city": "Paris"}' == parser.calls[0].function.arguments


def test_the_chat_template_picks_the_format():
    assert isinstance(auto_parser("{% for m in messages %}<tool_call>{% endfor %}"), HermesParser)
    assert isinstance(auto_parser("{{ bos_token }}{% if tools %}{{ tools | tojson }}{% endif %}"), Llama3JsonParser)
