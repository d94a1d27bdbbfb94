"""Tool calls in chat completions: the grammar that forces one, and parsers from text to calls.

`tool_choice` decides how calls come about:

- "none" (or no tools): plain text; the template does not see the tools.
- "required": the output is a JSON array of `{"name": ..., "parameters": {...}}` objects, one
  per call, each following its tool's parameter schema (vLLM's format), enforced by the grammar.
- a named function: the output is that function's arguments, a JSON object following its schema.
- "auto": the model writes calls in its own format, which the chat template tells: Hermes/Qwen
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks, or else Llama 3.x's bare
  JSON object `{"name": ..., "parameters": {...}}`; text outside the calls is the content.

Every parser takes text as it streams (`feed`) and says what of it is content and which tool call
deltas it completes; `finish` flushes the rest. A whole response is one feed and a finish, so a
streamed response and a whole one agree by construction.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from martlet.sampling_params import StructuredOutputsParams
from martlet.server.protocol import (
    ChatCompletionRequest,
    ChatTool,
    DeltaFunctionCall,
    DeltaToolCall,
    FunctionCall,
    NamedToolChoice,
    ToolCall,
)

ANY_OBJECT = {"type": "object"}


def tool_choice(body: ChatCompletionRequest) -> str | NamedToolChoice:
    """"none", "auto", "required" or the named function, with OpenAI's defaults and checks."""
    if not body.tools:
        if body.tool_choice not in (None, "none"):
            raise ValueError("tool_choice needs tools")
        return "none"
    choice = body.tool_choice or "auto"
    if isinstance(choice, NamedToolChoice) and choice.function.name not in {t.function.name for t in body.tools}:
        raise ValueError(f"tool_choice names {choice.function.name!r}, which is not among the tools")
    return choice


def tool_grammar(body: ChatCompletionRequest, choice: str | NamedToolChoice) -> StructuredOutputsParams | None:
    """The grammar that makes the output a valid call: for "required" and a named function only."""
    if isinstance(choice, NamedToolChoice):
        [tool] = [t for t in body.tools if t.function.name == choice.function.name]
        return StructuredOutputsParams(json=tool.function.parameters or ANY_OBJECT, disable_any_whitespace=True)
    if choice != "required":
        return None
    calls = {"type": "array", "minItems": 1, "items": {"anyOf": [_call_schema(t) for t in body.tools]}}
    if not body.parallel_tool_calls:
        calls["maxItems"] = 1
    return StructuredOutputsParams(json=calls, disable_any_whitespace=True)


def _call_schema(tool: ChatTool) -> dict:
    return {"type": "object", "required": ["name", "parameters"],
            "properties": {"name": {"type": "string", "enum": [tool.function.name]},
                           "parameters": tool.function.parameters or ANY_OBJECT}}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class Parsed:
    """What a piece of output turned out to be: content text and tool call deltas."""

    content: str = ""
    tool_calls: list[DeltaToolCall] = field(default_factory=list)


class ToolCallParser:
    """Base: collects the calls; subclasses decide what text is what."""

    def __init__(self) -> None:
        self.calls: list[ToolCall] = []

    def feed(self, text: str) -> Parsed:
        raise NotImplementedError

    def finish(self) -> Parsed:
        return Parsed()

    def _call(self, name: str, arguments: object) -> DeltaToolCall:
        """Record a whole call; its delta carries all of it."""
        arguments = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        call = ToolCall(id=new_call_id(), function=FunctionCall(name=name, arguments=arguments))
        self.calls.append(call)
        return DeltaToolCall(index=len(self.calls) - 1, id=call.id, type="function",
                             function=DeltaFunctionCall(name=name, arguments=arguments))


class NamedCallParser(ToolCallParser):
    """The output is the named function's arguments: they stream as they come."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def feed(self, text: str) -> Parsed:
        if not self.calls:  # the first delta names the call
            return Parsed(tool_calls=[self._call(self.name, text)])
        self.calls[0].function.arguments += text
        return Parsed(tool_calls=[DeltaToolCall(index=0, function=DeltaFunctionCall(arguments=text))] if text else [])


class CallArrayParser(ToolCallParser):
    """The output is a JSON array of {"name", "parameters"} objects: each call goes out whole, as soon
    as its object is complete."""

    def __init__(self) -> None:
        super().__init__()
        self.text = ""
        self.pos = 0  # where the next call's object (or the separator before it) starts

    def feed(self, text: str) -> Parsed:
        self.text += text
        parsed = Parsed()
        decoder = json.JSONDecoder()
        while True:
            start = self.pos
            while start < len(self.text) and self.text[start] in "[, \n\t\r":
                start += 1
            try:
                obj, end = decoder.raw_decode(self.text, start)
            except json.JSONDecodeError:
                return parsed
            if isinstance(obj, dict) and "name" in obj:
                parsed.tool_calls.append(self._call(obj["name"], obj.get("parameters", {})))
            self.pos = end


class HermesParser(ToolCallParser):
    """`<tool_call>{"name": ..., "arguments": ...}</tool_call>` blocks; text outside them is content."""

    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def __init__(self) -> None:
        super().__init__()
        self.pending = ""  # text not yet shown: a possible start of OPEN, or an unclosed call

    def feed(self, text: str) -> Parsed:
        self.pending += text
        parsed = Parsed()
        while True:
            start = self.pending.find(self.OPEN)
            if start == -1:
                keep = _partial_suffix(self.pending, self.OPEN)
                parsed.content += self.pending[: len(self.pending) - keep]
                self.pending = self.pending[len(self.pending) - keep :]
                return parsed
            parsed.content += self.pending[:start]
            self.pending = self.pending[start:]
            end = self.pending.find(self.CLOSE)
            if end == -1:
                return parsed
            body, self.pending = self.pending[len(self.OPEN) : end], self.pending[end + len(self.CLOSE) :]
            call = _json_object(body)
            if call is not None and "name" in call:
                parsed.tool_calls.append(self._call(call["name"], call.get("arguments", {})))
            else:  # not a call after all: it is content
                parsed.content += self.OPEN + body + self.CLOSE

    def finish(self) -> Parsed:
        parsed = Parsed()
        body = self.pending.removeprefix(self.OPEN)
        call = _json_object(body) if self.pending.startswith(self.OPEN) else None
        if call is not None and "name" in call:
            parsed.tool_calls.append(self._call(call["name"], call.get("arguments", {})))
        else:
            parsed.content = self.pending
        self.pending = ""
        return parsed


class Llama3JsonParser(ToolCallParser):
    """Llama 3.x: the whole output is `{"name": ..., "parameters": ...}` (several joined by ";"). An
    output that starts like one is held back until the end, then parsed; anything else is content."""

    def __init__(self) -> None:
        super().__init__()
        self.mode = "undecided"  # until the first non-blank character: then "content" or "call"
        self.held = ""

    def feed(self, text: str) -> Parsed:
        if self.mode == "undecided" and text.strip():
            self.mode = "call" if text.lstrip().startswith("{") else "content"
        if self.mode == "call":
            self.held += text
            return Parsed()
        return Parsed(content=text)

    def finish(self) -> Parsed:
        if self.mode != "call":
            return Parsed()
        calls = [_json_object(part) for part in self.held.split(";")]
        if any(c is None or "name" not in c for c in calls):
            return Parsed(content=self.held)
        return Parsed(tool_calls=[self._call(c["name"], c.get("parameters", c.get("arguments", {})))
                                  for c in calls])


def auto_parser(chat_template: str) -> ToolCallParser:
    """The parser for the model's own format, told by its chat template."""
    return HermesParser() if HermesParser.OPEN in (chat_template or "") else Llama3JsonParser()


def _json_object(text: str) -> dict | None:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of `text` that is a start of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0
