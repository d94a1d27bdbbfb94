"""What applications use beyond plain text, through the official `openai` client against one
`martlet serve` of the real default model (SmolLM2-135M-Instruct, CPU): JSON that follows a schema,
forced and required tool calls (whole and streamed), n choices, logit_bias, prompt logprobs, and
the request limits. Schemas bound their strings and numbers, so that a 135M model cannot wander
past max_tokens inside one (the grammar guarantees the shape, not that the model ends quickly).
"""

from __future__ import annotations

import asyncio
import json

import httpx
import jsonschema
import openai
import pytest
from test_server import API_KEY, MODEL_NAME, Server, _check_error

from martlet.models.gguf import default_model_path

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "likes_cats": {"type": "boolean"},
    },
    "required": ["name", "age", "likes_cats"],
}
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "The time in a time zone.",
                                      "parameters": {"type": "object", "required": ["zone"],
                                                     "properties": {"zone": {"type": "string", "maxLength": 12}}}}},
]
ASK_WEATHER = [{"role": "user", "content": "What is the weather like in Paris today?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(default_model_path(), tmp_path_factory.mktemp("logs") / "server.log", "--api-key", API_KEY,
               "--max-prompt-tokens", "200", "--max-body-bytes", str(1 << 20))
    yield s
    assert s.stop() == 0


def test_json_schema_outputs_validate(server):
    topics = ["a chef", "a pilot", "a child", "a farmer", "a poet", "a nurse", "a judge", "a sailor", "a baker",
              "a dancer", "a miner", "a coach", "a monk", "a spy", "a king", "a clown", "a vet", "a DJ",
              "a tailor", "an astronaut"]

    async def ask(client: openai.AsyncOpenAI, topic: str) -> str:
        reply = await client.chat.completions.create(
            model=MODEL_NAME, max_tokens=100, temperature=0.7, seed=len(topic),
            messages=[{"role": "user", "content": f"Describe {topic} as a JSON object."}],
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
        assert reply.choices[0].finish_reason == "stop"
        return reply.choices[0].message.content

    async def ask_all() -> list[str]:
        client = server.async_client()
        return await asyncio.gather(*(ask(client, topic) for topic in topics))

    for text in asyncio.run(ask_all()):
        jsonschema.validate(json.loads(text), PERSON)


def _check_call(name: str, arguments: str) -> None:
    [tool] = [t for t in TOOLS if t["function"]["name"] == name]
    jsonschema.validate(json.loads(arguments), tool["function"]["parameters"])


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_tool_calls_parse_whole_and_streamed(server, choice):
    client = server.client()
    kwargs = dict(model=MODEL_NAME, messages=ASK_WEATHER, tools=TOOLS, tool_choice=choice, max_tokens=60,
                  temperature=0)
    reply = client.chat.completions.create(**kwargs).choices[0]
    calls = reply.message.tool_calls
    assert calls and reply.message.content is None
    for call in calls:
        _check_call(call.function.name, call.function.arguments)
    if isinstance(choice, dict):
        assert [c.function.name for c in calls] == ["get_weather"] and reply.finish_reason == "stop"
    else:
        assert reply.finish_reason == "tool_calls"

    streamed: dict[int, dict] = {}
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for delta in chunk.choices[0].delta.tool_calls or []:
            call = streamed.setdefault(delta.index, {"id": delta.id, "name": delta.function.name, "arguments": ""})
            call["arguments"] += delta.function.arguments or ""
    assert [(c["name"], c["arguments"]) for c in streamed.values()] == \
        [(c.function.name, c.function.arguments) for c in calls]
    assert all(c["id"].startswith("call_") for c in streamed.values())


def test_tool_results_go_through_the_template(server):
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}
    messages = [*ASK_WEATHER, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 24 C"}]
    reply = server.client().chat.completions.create(model=MODEL_NAME, messages=messages, tools=TOOLS,
                                                    max_tokens=8, temperature=0)
    assert reply.usage.prompt_tokens > 20 and reply.choices[0].finish_reason in ("stop", "length")


def test_n_choices(server):
    client = server.client()
    reply = client.completions.create(model=MODEL_NAME, prompt="Three words about the sea:", n=3, max_tokens=6,
                                      temperature=1.0, seed=7)
    assert sorted(c.index for c in reply.choices) == [0, 1, 2]
    assert len({c.text for c in reply.choices}) > 1  # seeds 7, 8, 9: the choices differ
    assert reply.usage.completion_tokens == sum(6 for _ in reply.choices)
    texts = ["", "", ""]
    for chunk in client.chat.completions.create(model=MODEL_NAME, messages=ASK_WEATHER, n=3, max_tokens=5,
                                                temperature=1.0, seed=7, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert all(texts)


def test_logit_bias_forces_and_bans_a_token(server):
    client = server.client()
    tokenizer = _tokenizer()
    [banana] = tokenizer.encode(" banana")
    forced = client.completions.create(model=MODEL_NAME, prompt="My favourite colour is", max_tokens=4,
                                       temperature=0, logit_bias={str(banana): 100})
    assert forced.choices[0].text == " banana" * 4
    free = client.completions.create(model=MODEL_NAME, prompt="My favourite colour is", max_tokens=1, temperature=0,
                                     logprobs=0)
    [top] = tokenizer.encode(free.choices[0].logprobs.tokens[0])
    banned = client.completions.create(model=MODEL_NAME, prompt="My favourite colour is", max_tokens=1,
                                       temperature=0, logit_bias={str(top): -100})
    assert banned.choices[0].text != free.choices[0].text


def test_echo_with_logprobs_gives_prompt_logprobs(server):
    prompt = "The quick brown fox"
    reply = server.client().completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=2, temperature=0,
                                               echo=True, logprobs=1)
    choice = reply.choices[0]
    num_prompt = reply.usage.prompt_tokens
    assert choice.text.startswith(prompt)
    assert "".join(choice.logprobs.tokens[:num_prompt]) == prompt and len(choice.logprobs.tokens) == num_prompt + 2
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    assert all(lp <= 0 for lp in choice.logprobs.token_logprobs[1:])
    assert all(len(top) >= 1 for top in choice.logprobs.top_logprobs[1:])
    # best_of: the most likely of three samples, still with the prompt's logprobs.
    best = server.client().completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=2, temperature=1.0,
                                              echo=True, logprobs=1, best_of=3)
    assert len(best.choices) == 1 and best.usage.completion_tokens == 6
    assert best.choices[0].logprobs.tokens[:num_prompt] == choice.logprobs.tokens[:num_prompt]
    assert best.choices[0].logprobs.token_logprobs[:num_prompt] == choice.logprobs.token_logprobs[:num_prompt]
    plain = server.client().completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=2, best_of=2)
    assert plain.choices[0].logprobs is None


def test_limits_and_bad_input_then_normal_service(server):
    auth = {"Authorization": f"Bearer {API_KEY}"}
    url = f"{server.url}/v1/completions"
    big = json.dumps({"prompt": "x" * (2 << 20)}).encode()
    _check_error(httpx.post(url, content=big, headers={**auth, "Content-Type": "application/json"}), 413)

    def chunked():  # no Content-Length: the limit holds on the bytes as they come
        yield big[: 1 << 19]
        yield big[1 << 19 :]

    _check_error(httpx.post(url, content=chunked(), headers={**auth, "Content-Type": "application/json"}), 413)
    _check_error(httpx.post(url, json={"prompt": "hi " * 300}, headers=auth), 400)  # over --max-prompt-tokens
    chat = f"{server.url}/v1/chat/completions"
    for body, param in [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objec"}}}},
         "response_format"),
        ({"response_format": {"type": "json_object"}, "guided_regex": "a+"}, "structured_outputs"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"guided_regex": "a(b"}, "structured_outputs"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objec"}}}],
          "tool_choice": "required"}, "tools"),
    ]:
        response = httpx.post(chat, json={"messages": ASK_WEATHER, **body}, headers=auth)
        _check_error(response, 400)
        assert response.json()["error"]["param"] == param
    guided = server.client().completions.create(model=MODEL_NAME, prompt="Is water wet? Answer:", max_tokens=4,
                                                extra_body={"guided_choice": ["yes", "no"]})
    assert guided.choices[0].text in ("yes", "no")


def _tokenizer():
    from martlet.models.loader import load_tokenizer

    return load_tokenizer(default_model_path())
