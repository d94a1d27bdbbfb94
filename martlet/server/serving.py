"""The OpenAI endpoints: from a request body to engine requests, and from deltas to responses.

Both endpoints take the same path: check the request (model, capacity, prompt, sampling values)
before anything reaches the engine, run it, then either stream one SSE chunk per delta or merge
the deltas into one response. A streamed response is built from the very pieces a whole one is
built from, so the two agree by construction.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import aclosing, contextmanager
from dataclasses import dataclass, replace
from typing import Any

import jinja2
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from martlet.outputs import TokenLogprobs
from martlet.sampling_params import SamplingParams, StructuredOutputsParams
from martlet.server.async_engine import AsyncEngine, EngineDeadError, EngineError
from martlet.server.output_processor import Delta
from martlet.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatStreamChoice,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    DeltaToolCall,
    ErrorInfo,
    ErrorResponse,
    ModelCard,
    ModelList,
    NamedToolChoice,
    ResponseFormat,
    SamplingRequest,
    TokenLogprob,
    TopLogprob,
    UsageInfo,
)
from martlet.server.tool_calls import (
    CallArrayParser,
    NamedCallParser,
    ToolCallParser,
    auto_parser,
    tool_choice,
    tool_grammar,
)


class APIError(Exception):
    """An error the client gets as OpenAI's `{"error": {...}}` body with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.info = ErrorInfo(message=message, type=type, param=param, code=code)

    def response(self) -> JSONResponse:
        return JSONResponse(ErrorResponse(error=self.info).model_dump(), status_code=self.status)


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def engine_error(exc: EngineError) -> APIError:
    return APIError(503 if isinstance(exc, EngineDeadError) else 500, str(exc), "server_error")


@dataclass
class Prompt:
    token_ids: list[int]
    text: str | None = None  # None when it came as token ids


class OpenAIServing:
    def __init__(self, engine: AsyncEngine, model_name: str, max_waiting: int | None,
                 max_prompt_tokens: int | None = None) -> None:
        self.engine = engine
        self.model_name = model_name
        self.max_waiting = max_waiting
        self.max_prompt_tokens = max_prompt_tokens

    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.model_name, max_model_len=self.engine.max_model_len)])

    # ---- /v1/completions ----------------------------------------------------------------------

    async def completion(self, body: CompletionRequest, request: Request) -> Response:
        self._check_model(body.model)
        best_of = body.best_of or body.n
        if best_of < body.n:
            raise bad_request(f"best_of ({best_of}) must be >= n ({body.n})", "best_of")
        if best_of > body.n and body.stream:
            raise bad_request("best_of > n cannot be streamed: the best choices are known only at the end", "best_of")
        with _as_bad_request("prompt"):
            prompts = [self._prompt(p) for p in _prompt_list(body.prompt)]
        # Choosing the best needs every choice's logprobs; echo with logprobs shows the prompt's.
        logprobs = body.logprobs if best_of == body.n else (body.logprobs or 0)
        prompt_logprobs = body.prompt_logprobs if body.prompt_logprobs is not None else (
            body.logprobs if body.echo else None)
        params = self._sampling_params(body, prompts, max_tokens=body.max_tokens, logprobs=logprobs, n=best_of,
                                       prompt_logprobs=prompt_logprobs)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        formatter = _CompletionChoices(prompts, body.n, body.echo, self._prompt_text, self._token_text)
        deltas = self._generate(request_id, prompts, params)

        def chunk(choices: list[CompletionChoice], usage: UsageInfo | None = None) -> CompletionResponse:
            return CompletionResponse(id=request_id, model=self.model_name, choices=choices, usage=usage)

        if body.stream:
            events = _sse(deltas, lambda i, d: chunk([formatter.piece(i, d)]), prompts, body.include_usage,
                          lambda usage: chunk([], usage))
            return StreamingResponse(events, media_type="text/event-stream")
        merged = await _unless_disconnected(request, _merge(deltas, len(prompts) * best_of))
        if merged is None:
            return Response(status_code=499)  # nobody is listening
        usage = _usage(prompts, merged)
        if best_of > body.n:
            merged = _best(merged, best_of, body.n, keep_logprobs=body.logprobs is not None)
        return _json(chunk([formatter.piece(i, d) for i, d in enumerate(merged)], usage))

    # ---- /v1/chat/completions -----------------------------------------------------------------

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        self._check_model(body.model)
        with _as_bad_request("tool_choice"):
            tools = tool_choice(body)
        with _as_bad_request("messages"):
            prompt = self._chat_prompt(body, with_tools=tools != "none")
        structured = _chat_grammar(body, tools)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = self._sampling_params(body, [prompt], max_tokens=max_tokens, logprobs=body.num_logprobs,
                                       structured_outputs=structured)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        formatter = _ChatChoices(body.top_logprobs or 0, self._token_text, self._tool_parser_maker(tools))
        deltas = self._generate(request_id, [prompt], params)

        def chunk(choices: list[ChatStreamChoice], usage: UsageInfo | None = None) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=request_id, model=self.model_name, choices=choices, usage=usage)

        if body.stream:
            roles = [chunk([ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
                     for i in range(body.n)]
            events = _sse(deltas, lambda i, d: chunk([piece]) if (piece := formatter.piece(i, d)) else None,
                          [prompt], body.include_usage, lambda usage: chunk([], usage), first=roles)
            return StreamingResponse(events, media_type="text/event-stream")
        merged = await _unless_disconnected(request, _merge(deltas, body.n))
        if merged is None:
            return Response(status_code=499)
        return _json(ChatCompletionResponse(id=request_id, model=self.model_name, usage=_usage([prompt], merged),
                                            choices=[formatter.whole(i, d) for i, d in enumerate(merged)]))

    def _tool_parser_maker(self, tools: str | NamedToolChoice) -> Callable[[], ToolCallParser] | None:
        if isinstance(tools, NamedToolChoice):
            return lambda: NamedCallParser(tools.function.name)
        if tools == "required":
            return CallArrayParser
        if tools == "auto":
            template = self.engine.tokenizer.chat_template
            return lambda: auto_parser(template)
        return None

    # ---- checks, before the engine sees anything -------------------------------------------------

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"The model `{model}` does not exist; this server serves `{self.model_name}`.",
                           param="model", code="model_not_found")

    def _prompt(self, prompt: str | list[int]) -> Prompt:
        if isinstance(prompt, str):
            return Prompt(self.engine.tokenize(prompt), prompt)
        return Prompt(list(prompt))

    def _chat_prompt(self, body: ChatCompletionRequest, with_tools: bool) -> Prompt:
        tokenizer = self.engine.tokenizer
        if tokenizer is None or not tokenizer.chat_template:
            raise ValueError("this model has no chat template: use /v1/completions")
        tools = [tool.model_dump(exclude_none=True) for tool in body.tools] if with_tools else None
        text = tokenizer.apply_chat_template(
            [m.for_template() for m in body.messages], tools=tools,
            add_generation_prompt=body.add_generation_prompt, tokenize=False,
        )
        return self._prompt(text)

    def _sampling_params(self, body: SamplingRequest, prompts: list[Prompt], **fields: Any) -> list[SamplingParams]:
        """One SamplingParams per prompt (see SamplingRequest.sampling_params for `fields`); None for
        max_tokens means the rest of the context."""
        if not prompts:
            raise bad_request("the prompt is empty", "prompt")
        if body.stop and self.engine.tokenizer is None:
            raise bad_request("stop strings need a tokenizer, and this model has none: use stop_token_ids", "stop")
        with _as_bad_request("structured_outputs"):
            params = body.sampling_params(**fields)
        result = []
        for prompt in prompts:
            if self.max_prompt_tokens is not None and len(prompt.token_ids) > self.max_prompt_tokens:
                raise bad_request(f"the prompt is {len(prompt.token_ids)} tokens long; this server takes at most "
                                  f"{self.max_prompt_tokens} per prompt", "prompt")
            params = replace(params)  # each prompt's own: max_tokens may be filled in below
            with _as_bad_request("prompt"):
                self.engine.validate_request(prompt.token_ids, params)
            room = self.engine.max_model_len - len(prompt.token_ids)
            if params.max_tokens is None:
                params.max_tokens = room
            elif params.max_tokens > room:
                raise bad_request(
                    f"This model's maximum context length is {self.engine.max_model_len} tokens. However, you "
                    f"requested {len(prompt.token_ids) + params.max_tokens} tokens ({len(prompt.token_ids)} in "
                    f"the prompt, {params.max_tokens} for the completion). Please reduce the prompt or max_tokens.",
                    "max_tokens",
                )
            result.append(params)
        return result

    def _generate(self, request_id: str, prompts: list[Prompt], params: list[SamplingParams],
                  ) -> AsyncIterator[tuple[int, Delta]]:
        if self.engine.error is not None:
            raise engine_error(self.engine.error)
        if self.max_waiting is not None and self.engine.num_waiting + len(prompts) > self.max_waiting:
            raise APIError(429, f"the server is busy: more than {self.max_waiting} requests are waiting; retry later",
                           "rate_limit_error", code="rate_limit_exceeded")
        return self.engine.generate(request_id, [p.token_ids for p in prompts], params)

    def _token_text(self, token_id: int) -> str:
        tokenizer = self.engine.tokenizer
        return tokenizer.decode([token_id]) if tokenizer is not None else f"token_id:{token_id}"

    def _prompt_text(self, prompt: Prompt) -> str:
        if prompt.text is not None or self.engine.tokenizer is None:
            return prompt.text or ""
        return self.engine.tokenizer.decode(prompt.token_ids)


def _chat_grammar(body: ChatCompletionRequest, tools: str | NamedToolChoice) -> StructuredOutputsParams | None:
    """The grammar of a chat request, from whichever field asks for one (a forcing tool_choice,
    response_format, or vLLM's fields); a 400 naming the field if it cannot be used or if two ask."""
    with _grammar_error_as("tools"):
        forced = tool_grammar(body, tools)
    with _grammar_error_as("response_format"):
        formatted = _response_format_grammar(body.response_format)
    with _as_bad_request("structured_outputs"):
        requested = body.structured_output_params()
    given = {name: grammar for name, grammar in (("tool_choice", forced), ("response_format", formatted),
                                                  ("structured_outputs", requested)) if grammar is not None}
    if len(given) > 1:
        raise bad_request(f"{' and '.join(given)} each fix the output's format: give only one", list(given)[1])
    return next(iter(given.values()), None)


def _response_format_grammar(fmt: ResponseFormat | None) -> StructuredOutputsParams | None:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return StructuredOutputsParams(json_object=True)
    if fmt.json_schema is None:
        raise ValueError("response_format of type json_schema needs a json_schema")
    return StructuredOutputsParams(json=fmt.json_schema.schema_)


@contextmanager
def _grammar_error_as(param: str) -> Iterator[None]:
    """A grammar made from `param` that cannot be used: a 400 that names `param`, not structured_outputs."""
    try:
        yield
    except ValueError as exc:
        raise bad_request(re.sub(r"^SamplingParams\.structured_outputs\.\w+", param, str(exc)), param) from exc


@contextmanager
def _as_bad_request(param: str) -> Iterator[None]:
    """Turn the ValueError of bad input (or a chat template's error) into a 400 naming the field:
    the one a SamplingParams message names, else `param`."""
    try:
        yield
    except (ValueError, jinja2.TemplateError) as exc:
        named = re.match(r"SamplingParams\.(\w+)", str(exc))
        raise bad_request(str(exc), named[1] if named else param) from exc


# ---- turning deltas into responses ------------------------------------------------------------


class _CompletionChoices:
    """Makes completion choices from deltas; the pieces of a stream add up to the whole.

    Choice c answers prompt c // n. With echo, its first piece starts with the prompt, and with
    prompt logprobs (echo and logprobs) the logprobs start with the prompt's tokens: None for the
    first, which nothing predicts, as in OpenAI's API.
    """

    def __init__(self, prompts: list[Prompt], n: int, echo: bool, prompt_text: Callable[[Prompt], str],
                 token_text: Callable[[int], str]) -> None:
        self.prompts = prompts
        self.n = n
        self.echo = echo
        self.prompt_text = prompt_text
        self.token_text = token_text
        self.started: set[int] = set()  # choices whose first piece has gone out
        self.offset: dict[int, int] = {}  # per choice: where the next token's text starts
        self.prompt_logprobs: dict[int, list[TokenLogprobs | None]] = {}  # per prompt, from its first choice

    def piece(self, index: int, delta: Delta) -> CompletionChoice:
        prompt = index // self.n
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs[prompt] = delta.prompt_logprobs
        text, logprobs = delta.text, None
        first = index not in self.started
        self.started.add(index)
        if first and self.echo:
            echoed = self.prompt_text(self.prompts[prompt])
            text = echoed + text
            if prompt in self.prompt_logprobs:
                logprobs = CompletionLogprobs()
                self.offset[index] = 0
                self._add(logprobs, index, self.prompts[prompt].token_ids, self.prompt_logprobs[prompt])
            else:
                self.offset[index] = len(echoed)
        if delta.logprobs is not None:
            logprobs = logprobs or CompletionLogprobs()
            self._add(logprobs, index, delta.token_ids, delta.logprobs)
        return CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=delta.finish_reason,
                                stop_reason=delta.stop_reason)

    def _add(self, logprobs: CompletionLogprobs, index: int, token_ids: list[int],
             rows: list[TokenLogprobs | None]) -> None:
        for token, top in zip(token_ids, rows):
            token_str = self.token_text(token)
            logprobs.tokens.append(token_str)
            logprobs.token_logprobs.append(None if top is None else top.get(token))
            logprobs.top_logprobs.append(None if top is None else {self.token_text(t): lp for t, lp in top.items()})
            logprobs.text_offset.append(self.offset.get(index, 0))
            self.offset[index] = self.offset.get(index, 0) + len(token_str)


class _ChatChoices:
    """Makes chat choices (streamed or whole) from deltas; with tools, each choice's text goes
    through its own tool call parser, which splits it into content and calls."""

    def __init__(self, num_top_logprobs: int, token_text: Callable[[int], str],
                 make_parser: Callable[[], ToolCallParser] | None) -> None:
        self.num_top_logprobs = num_top_logprobs
        self.token_text = token_text
        self.make_parser = make_parser
        self.parsers: dict[int, ToolCallParser] = {}

    def piece(self, index: int, delta: Delta) -> ChatStreamChoice | None:
        """A chunk's choice; None when a tool call parser holds back all of the delta."""
        content, tool_calls, finish_reason = self._parse(index, delta)
        if self.make_parser is not None and not (content or tool_calls or finish_reason or delta.logprobs):
            return None
        return ChatStreamChoice(index=index, delta=DeltaMessage(content=content, tool_calls=tool_calls or None),
                                logprobs=self._logprobs(delta), finish_reason=finish_reason,
                                stop_reason=delta.stop_reason)

    def whole(self, index: int, delta: Delta) -> ChatChoice:
        content, _, finish_reason = self._parse(index, delta)
        calls = self.parsers[index].calls if index in self.parsers else []
        message = AssistantMessage(content=content if content or not calls else None, tool_calls=calls)
        return ChatChoice(index=index, message=message, logprobs=self._logprobs(delta),
                          finish_reason=finish_reason, stop_reason=delta.stop_reason)

    def _parse(self, index: int, delta: Delta) -> tuple[str, list[DeltaToolCall], str | None]:
        """Content and tool call deltas of this piece, and the finish reason ("tool_calls" once a call
        was made, unless the call was forced by name, for which OpenAI says "stop")."""
        if self.make_parser is None:
            return delta.text, [], delta.finish_reason
        parser = self.parsers.setdefault(index, self.make_parser())
        parsed = parser.feed(delta.text)
        finish_reason = delta.finish_reason
        if finish_reason is not None:
            rest = parser.finish()
            parsed.content += rest.content
            parsed.tool_calls += rest.tool_calls
            if parser.calls and finish_reason == "stop" and not isinstance(parser, NamedCallParser):
                finish_reason = "tool_calls"
        return parsed.content, parsed.tool_calls, finish_reason

    def _logprobs(self, delta: Delta) -> ChatLogprobs | None:
        if delta.logprobs is None:
            return None
        return ChatLogprobs(content=[self._token(token, top) for token, top in zip(delta.token_ids, delta.logprobs)])

    def _token(self, token: int, top: TokenLogprobs) -> TokenLogprob:
        # `top` holds the N most likely tokens and the sampled one, which may rank below them.
        ranked = sorted(top.items(), key=lambda item: -item[1])[: self.num_top_logprobs]
        top_logprobs = [self._entry(t, lp) for t, lp in ranked]
        return TokenLogprob(**dict(self._entry(token, top[token])), top_logprobs=top_logprobs)

    def _entry(self, token: int, logprob: float) -> TopLogprob:
        text = self.token_text(token)
        return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode()))


def _best(merged: list[Delta], best_of: int, n: int, keep_logprobs: bool) -> list[Delta]:
    """Per prompt, the n of its best_of choices with the highest total logprob, in that order."""
    chosen = []
    for start in range(0, len(merged), best_of):
        group = merged[start : start + best_of]
        ranked = sorted(group, key=lambda d: -sum(top[t] for t, top in zip(d.token_ids, d.logprobs or [])))[:n]
        ranked = [d if keep_logprobs else replace(d, logprobs=None) for d in ranked]
        # The prompt's logprobs came with its first choice, which may not be among the best.
        ranked[0] = replace(ranked[0], prompt_logprobs=next((d.prompt_logprobs for d in group if d.prompt_logprobs),
                                                             None))
        chosen += ranked
    return chosen


def _prompt_list(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]
    return list(prompt)


def _usage(prompts: list[Prompt], deltas: list[Delta]) -> UsageInfo:
    return _usage_of(prompts, sum(len(d.token_ids) for d in deltas))


def _usage_of(prompts: list[Prompt], completion_tokens: int) -> UsageInfo:
    prompt_tokens = sum(len(p.token_ids) for p in prompts)
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens)


def _json(body: BaseModel) -> Response:
    return Response(body.model_dump_json(), media_type="application/json")


async def _merge(deltas: AsyncIterator[tuple[int, Delta]], n: int) -> list[Delta]:
    merged = [Delta() for _ in range(n)]
    async with aclosing(deltas):
        async for index, delta in deltas:
            merged[index] += delta
    return merged


async def _sse(
    deltas: AsyncIterator[tuple[int, Delta]], make_chunk: Callable[[int, Delta], BaseModel | None],
    prompts: list[Prompt], include_usage: bool, usage_chunk: Callable[[UsageInfo], BaseModel],
    first: list[BaseModel] = (),
) -> AsyncIterator[str]:
    """Server-sent events: a chunk per delta, usage if asked, then [DONE].

    A client that goes away cancels this generator at its next await; `aclosing` then closes
    `deltas`, which aborts the engine requests.
    """
    completion_tokens = 0
    async with aclosing(deltas):
        try:
            for event in first:
                yield _event(event)
            async for index, delta in deltas:
                completion_tokens += len(delta.token_ids)
                if (chunk := make_chunk(index, delta)) is not None:  # None: nothing to show yet
                    yield _event(chunk)
            if include_usage:
                yield _event(usage_chunk(_usage_of(prompts, completion_tokens)))
        except EngineError as exc:  # the status line is long gone: report it in the stream
            yield _event(ErrorResponse(error=engine_error(exc).info))
    yield "data: [DONE]\n\n"


def _event(body: BaseModel) -> str:
    return f"data: {body.model_dump_json()}\n\n"


async def _unless_disconnected(request: Request, work: Awaitable[list[Delta]]) -> list[Delta] | None:
    """Run `work` while watching the connection; if the client leaves first, cancel it, return None.

    The request body has been read, so the next ASGI message can only be the disconnect.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this handler itself is cancelled (shutdown): never leave `work` running
        watcher.cancel()
        if not task.done():
            task.cancel()  # closing its engine iterator aborts the engine requests
    return task.result() if task in done else None


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
