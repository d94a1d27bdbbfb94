"""The OpenAI-compatible server, driven by the official `openai` client against a real process.

One server (tiny random Llama, CPU) serves most tests; a second one, with a batch of one and a
waiting queue of one, is made busy on purpose (429) and then stopped with SIGTERM. Greedy results
are compared with offline `LLM.generate` on the same model. Token budgets are small: the whole
file is meant to run in about a minute on two cores.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from martlet.sampling_params import SamplingParams
from martlet.server.async_engine import AsyncEngine, EngineError, EngineStartupError
from martlet.server.output_processor import Delta, OutputProcessor
from martlet.testing import load_test_tokenizer, make_tiny_model

API_KEY = "sk-martlet-test"
MODEL_NAME = "tiny"
ENGINE_ARGS = ["--device", "cpu", "--max-model-len", "512", "--num-kv-blocks", "256"]
PROMPTS = ["Hello, my name is", "The capital of France is", "Once upon a time", "1, 2, 3,"]


class Server:
    """A `python -m martlet.server` process on a free loopback port."""

    def __init__(self, model: Path, log: Path, *args: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "martlet.server", "--model", str(model), "--port", str(self.port),
                   "--served-model-name", MODEL_NAME, "--disable-access-log", *ENGINE_ARGS, *args]
        # One torch thread: the machine is shared, and spinning thread pools slow everyone down.
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 180
        while not self._healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                pytest.fail(f"the server did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=API_KEY, max_retries=0)

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=API_KEY, max_retries=0)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"{self.url}/metrics").text
        return {name: float(value) for name, value in re.findall(r"^([^#\s]+) (\S+)$", text, re.M)}

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    s = Server(model, tmp_path_factory.mktemp("logs") / "server.log", "--api-key", API_KEY)
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def busy_server(model, tmp_path_factory):
    s = Server(model, tmp_path_factory.mktemp("logs") / "busy.log", "--api-key", API_KEY,
               "--max-num-seqs", "1", "--max-waiting", "1")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def llm(model):
    from martlet import LLM

    return LLM(str(model), device="cpu", max_model_len=512, num_kv_blocks=256)


def greedy(max_tokens: int, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kwargs)


# ---- the front end's detokenizing, on its own ------------------------------------------------------


def _feed(processor: OutputProcessor, token_ids: list[int], finish_reason: str = "length") -> list[Delta]:
    """Send a request's tokens through `processor` one step at a time, as the engine core would."""
    deltas = []
    for n, token in enumerate(token_ids, 1):
        deltas.append(processor.process([token], None, finish_reason if n == len(token_ids) else None, None))
        if processor.finished:
            break
    return deltas


def test_multibyte_characters_never_split():
    tokenizer = load_test_tokenizer()
    text = " héllo wörld, 你好世界 🎉🦀 naïve café"
    token_ids = tokenizer.encode(text)
    assert any("\ufffd" in tokenizer.decode([t]) for t in token_ids)  # some tokens are parts of a character
    deltas = _feed(OutputProcessor(tokenizer, [1], greedy(64)), token_ids)
    assert all("\ufffd" not in d.text for d in deltas)
    assert "".join(d.text for d in deltas) == tokenizer.decode(token_ids)


def test_stop_string_spanning_tokens_is_never_shown():
    tokenizer = load_test_tokenizer()
    token_ids = tokenizer.encode(" The quick brown fox jumps over the lazy dog")
    stop = "own fo"  # the end of " brown" and the start of " fox"
    processor = OutputProcessor(tokenizer, [1], greedy(64, stop=[stop, "never"]))
    deltas = _feed(processor, token_ids)
    assert "".join(d.text for d in deltas) == " The quick br"
    assert (deltas[-1].finish_reason, deltas[-1].stop_reason) == ("stop", stop)
    # Tokens up to and including " fox" count as output, as the offline engine counts them.
    assert processor.num_tokens == token_ids.index(tokenizer.encode(" fox")[0]) + 1
    # Stop strings count only once min_tokens are out, as offline (and in vLLM).
    late = _feed(OutputProcessor(tokenizer, [1], greedy(64, stop=[stop], min_tokens=6)), token_ids)
    assert "".join(d.text for d in late) == tokenizer.decode(token_ids)


# ---- results match the offline engine ----------------------------------------------------------------


def test_completions_match_offline(server, llm):
    expected = llm.generate(PROMPTS, greedy(12), use_tqdm=False)
    client = server.client()
    batch = client.completions.create(model=MODEL_NAME, prompt=PROMPTS, max_tokens=12, temperature=0)
    assert [c.text for c in sorted(batch.choices, key=lambda c: c.index)] == [e.outputs[0].text for e in expected]
    assert batch.usage.completion_tokens == sum(len(e.outputs[0].token_ids) for e in expected)
    assert batch.usage.prompt_tokens == sum(len(e.prompt_token_ids) for e in expected)
    ids = client.completions.create(model=MODEL_NAME, prompt=expected[0].prompt_token_ids, max_tokens=12,
                                    temperature=0, echo=True)
    assert ids.choices[0].text == PROMPTS[0] + expected[0].outputs[0].text
    assert ids.choices[0].finish_reason == "length"


def test_chat_matches_offline(server, llm):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    [expected] = llm.chat(messages, greedy(10), use_tqdm=False)
    reply = server.client().chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=10,
                                                    temperature=0)
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected.outputs[0].text
    assert reply.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert reply.usage.completion_tokens == len(expected.outputs[0].token_ids)


def test_logprobs(server):
    client = server.client()
    completion = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=4, temperature=0,
                                           logprobs=2)
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 4
    assert "".join(logprobs.tokens) == completion.choices[0].text
    assert all(max(top.values()) == lp for top, lp in zip(logprobs.top_logprobs, logprobs.token_logprobs))
    chat = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=3, temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 3 for t in content)
    assert all(t.top_logprobs[0].logprob == t.logprob for t in content)  # greedy takes the top token


# ---- streaming ---------------------------------------------------------------------------------------


async def _stream_completion(client: openai.AsyncOpenAI, prompt: str, **kwargs) -> tuple[str, list]:
    stream = await client.completions.create(model=MODEL_NAME, prompt=prompt, stream=True, **kwargs)
    chunks = [chunk async for chunk in stream]
    return "".join(c.choices[0].text for c in chunks if c.choices), chunks


def test_stream_equals_whole(server):
    client = server.client()
    kwargs = dict(model=MODEL_NAME, max_tokens=16, temperature=0)
    whole = client.completions.create(prompt=PROMPTS[1], **kwargs)
    text, chunks = asyncio.run(_stream_completion(server.async_client(), PROMPTS[1], max_tokens=16,
                                                  temperature=0, stream_options={"include_usage": True}))
    assert text == whole.choices[0].text
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16

    messages = [{"role": "user", "content": "Tell me a story."}]
    whole = client.chat.completions.create(messages=messages, **kwargs)
    chunks = list(client.chat.completions.create(messages=messages, stream=True,
                                                 stream_options={"include_usage": True}, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].usage == whole.usage


def test_stop_string_spanning_tokens_in_stream(server, llm):
    tokenizer = llm.get_tokenizer()
    [free] = llm.generate(PROMPTS[2], greedy(24), use_tqdm=False)
    ids = free.outputs[0].token_ids
    # A stop string made of the last two characters of one token and the first two of the next.
    k = next(k for k in range(4, len(ids) - 1)
             if len(tokenizer.decode(ids[k:k + 1])) >= 2 and len(tokenizer.decode(ids[k + 1:k + 2])) >= 2)
    boundary = len(tokenizer.decode(ids[: k + 1]))
    stop = free.outputs[0].text[boundary - 2 : boundary + 2]
    [expected] = llm.generate(PROMPTS[2], greedy(24, stop=stop), use_tqdm=False)
    assert expected.outputs[0].finish_reason == "stop"
    text, chunks = asyncio.run(_stream_completion(server.async_client(), PROMPTS[2], max_tokens=24,
                                                  temperature=0, stop=[stop]))
    assert text == expected.outputs[0].text and stop not in text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_48_concurrent_streams(server, llm):
    prompts = [f"Request number {i} says" for i in range(48)]
    expected = [o.outputs[0].text for o in llm.generate(prompts, greedy(8), use_tqdm=False)]

    async def run_all() -> list[str]:
        client = server.async_client()
        results = await asyncio.gather(*(_stream_completion(client, p, max_tokens=8, temperature=0)
                                         for p in prompts))
        return [text for text, _ in results]

    assert asyncio.run(run_all()) == expected


@pytest.fixture(scope="module")
def bare_model(model, tmp_path_factory) -> Path:
    """The tiny model's config.json alone: dummy weights and no tokenizer, like the 7B benchmark dirs."""
    bare = tmp_path_factory.mktemp("bare")
    shutil.copy(model / "config.json", bare)
    return bare


def _serve_in_process(model_dir: Path, scenario) -> AsyncEngine:
    """Run `scenario(engine, client)` against the app in this process (its engine core in a child)."""
    from martlet.server.api import build_app

    engine = AsyncEngine(str(model_dir), dict(load_format="dummy", device="cpu", max_model_len=64, num_kv_blocks=8,
                                              quiet=True))
    app = build_app(engine, "bare")

    async def run() -> None:
        transport = httpx.ASGITransport(app=app)
        async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://x") as c:
            await scenario(engine, c)

    asyncio.run(run())
    return engine


def test_tokens_only_model(bare_model):
    async def scenario(engine, client: httpx.AsyncClient) -> None:
        assert engine.tokenizer is None
        body = {"prompt": [5, 6, 7], "max_tokens": 4, "ignore_eos": True, "logprobs": 1}
        whole = (await client.post("/v1/completions", json=body)).json()
        assert whole["choices"][0]["text"] == "" and whole["usage"]["completion_tokens"] == 4
        assert all(t.startswith("token_id:") for t in whole["choices"][0]["logprobs"]["tokens"])
        streamed = (await client.post("/v1/completions", json={**body, "stream": True})).text
        assert streamed.endswith("data: [DONE]\n\n")
        chunks = [json.loads(event[len("data: "):])["choices"][0] for event in streamed.split("\n\n")[:-2]]
        # Every chunk carries the tokens made since the last (one, unless this reader fell a step
        # behind the engine core, which runs freely in its own process), all four in the end.
        assert all(c["text"] == "" and c["logprobs"]["tokens"] for c in chunks)
        assert sum(len(c["logprobs"]["tokens"]) for c in chunks) == 4 and chunks[-1]["finish_reason"] == "length"
        for bad in ({"prompt": "text"}, {"prompt": [5], "stop": "x"}):
            assert (await client.post("/v1/completions", json=bad)).status_code == 400
        chat = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 400
        # Past the front end's checks (here skipped), the engine core refuses the request alone.
        with pytest.raises(EngineError, match="refused"):
            async for _ in engine.generate("bad", [[10**9]], [greedy(2)]):
                pass
        assert (await client.post("/v1/completions", json=body)).status_code == 200

    engine = _serve_in_process(bare_model, scenario)
    assert engine.core_process.exitcode == 0  # the app's end stopped it


def test_dead_engine_answers_503(bare_model):
    async def scenario(engine, client: httpx.AsyncClient) -> None:
        assert (await client.get("/health")).status_code == 200
        core = engine.core_process.pid
        os.kill(core, signal.SIGSTOP)  # frozen, so the next request is surely in flight when it dies
        in_flight = asyncio.ensure_future(client.post("/v1/completions", json={"prompt": [5, 6], "max_tokens": 2}))
        while engine.num_waiting == 0:
            await asyncio.sleep(0.01)
        os.kill(core, signal.SIGKILL)
        for response in (await in_flight, await client.post("/v1/completions", json={"prompt": [5], "max_tokens": 2})):
            _check_error(response, 503)  # the request in flight when it died, then one after
            assert "engine process died" in response.json()["error"]["message"]
        assert (await client.get("/health")).status_code == 503

    assert _serve_in_process(bare_model, scenario).core_process.exitcode == -signal.SIGKILL


def test_engine_that_cannot_start_is_a_clear_error(tmp_path):
    with pytest.raises(EngineStartupError, match="does not exist"):
        AsyncEngine(str(tmp_path / "nothing-here"), dict(device="cpu", quiet=True))


# ---- bad input, and the server carries on ------------------------------------------------------------


def _check_error(response: httpx.Response, status: int) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]


@pytest.mark.parametrize("body, status, param", [
    ({"prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
    ({"max_tokens": 4}, 400, "prompt"),
    ({"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ({"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ({"prompt": "hi", "n": 0}, 400, "n"),
    ({"prompt": "hi", "suffix": "!"}, 400, "suffix"),
    ({"prompt": "hi", "stream_options": {"include_usage": True}}, 400, None),  # only with stream: true
    ({"prompt": "hi", "logit_bias": {"5": 101}}, 400, "logit_bias"),
    ({"prompt": "hi", "logit_bias": {"999999": 1}}, 400, "logit_bias"),
    ({"prompt": "hi", "stop_token_ids": [10**9]}, 400, "stop_token_ids"),
    ({"prompt": "hi", "logprobs": 99}, 400, "logprobs"),
    ({"prompt": "hi", "max_tokens": 600}, 400, "max_tokens"),
    ({"prompt": [1] * 600}, 400, "prompt"),
    ({"prompt": [10**9]}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": "hi", "model": "gpt-4"}, 404, "model"),
])
def test_bad_completion_requests(server, body, status, param):
    response = httpx.post(f"{server.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"})
    _check_error(response, status)
    assert response.json()["error"]["param"] == param


def test_errors_in_openai_shape_then_normal_service(server):
    client = server.client()
    kwargs = dict(model=MODEL_NAME, prompt=PROMPTS[3], max_tokens=120, temperature=0, extra_body={"ignore_eos": True})
    expected = client.completions.create(**kwargs).choices[0].text
    in_flight = iter(client.completions.create(stream=True, **kwargs))
    streamed = next(in_flight).choices[0].text  # a request in flight while the bad ones come

    auth = {"Authorization": f"Bearer {API_KEY}"}
    url = f"{server.url}/v1/completions"
    _check_error(httpx.post(url, content=b'{"prompt": "hi", ', headers=auth), 400)  # malformed JSON
    _check_error(httpx.post(url, json={"prompt": "hi"}, headers={"Authorization": "Bearer wrong"}), 401)
    _check_error(httpx.post(url, json={"prompt": "hi"}), 401)
    _check_error(httpx.post(f"{server.url}/v1/chat/completions", json={"messages": []}, headers=auth), 400)
    _check_error(httpx.get(f"{server.url}/v1/nothing-here", headers=auth), 404)
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}],
                                       temperature=-2)
    assert "temperature" in bad.value.message
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="hi")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    assert client.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=3).usage.completion_tokens == 3
    assert streamed + "".join(chunk.choices[0].text for chunk in in_flight) == expected


def test_models_health_metrics(server):
    assert [m.id for m in server.client().models.list().data] == [MODEL_NAME]
    assert httpx.get(f"{server.url}/health").status_code == 200
    metrics = server.metrics()
    for name in ("martlet_num_requests_running", "martlet_num_requests_waiting", "martlet_kv_cache_usage",
                 "martlet_time_to_first_token_seconds_count", "martlet_e2e_request_latency_seconds_count"):
        assert name in metrics


# ---- clients that leave --------------------------------------------------------------------------------


def _wait_idle(server: Server, timeout: float = 10) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        metrics = server.metrics()
        idle = metrics["martlet_num_requests_running"] == 0 and metrics["martlet_kv_cache_usage"] == 0
        if idle or time.monotonic() > deadline:
            return metrics
        time.sleep(0.05)


def _aborted(metrics: dict[str, float]) -> float:
    return metrics.get('martlet_requests_total{finished_reason="abort"}', 0.0)


def test_dropped_stream_frees_its_blocks(server):
    before = _aborted(_wait_idle(server))
    stream = server.client().completions.create(model=MODEL_NAME, prompt="Long story:", max_tokens=480,
                                                stream=True, extra_body={"ignore_eos": True})
    for _, _chunk in zip(range(3), stream):
        pass
    assert server.metrics()["martlet_num_requests_running"] == 1
    stream.close()
    metrics = _wait_idle(server)
    assert metrics["martlet_num_requests_running"] == 0 and metrics["martlet_kv_cache_usage"] == 0
    assert _aborted(metrics) == before + 1


def test_dropped_request_frees_its_blocks(server):
    before = _aborted(_wait_idle(server))
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=0.5,
                   json={"prompt": "Long story:", "max_tokens": 480, "ignore_eos": True})
    metrics = _wait_idle(server)
    assert metrics["martlet_num_requests_running"] == 0 and metrics["martlet_kv_cache_usage"] == 0
    assert _aborted(metrics) == before + 1


# ---- load limits and shutdown --------------------------------------------------------------------------


def test_full_queue_answers_429(busy_server):
    client = busy_server.client()
    kwargs = dict(model=MODEL_NAME, prompt="Long story:", max_tokens=480, stream=True, extra_body={"ignore_eos": True})
    running = client.completions.create(**kwargs)
    next(iter(running))
    waiting = client.completions.create(**kwargs)  # returns once headers arrive, before any token
    deadline = time.monotonic() + 10
    while busy_server.metrics()["martlet_num_requests_waiting"] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(openai.RateLimitError) as full:
        client.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=2)
    assert full.value.status_code == 429 and full.value.body["code"] == "rate_limit_exceeded"
    running.close()
    waiting.close()
    _wait_idle(busy_server)
    assert client.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=2).usage.completion_tokens == 2


def test_sigterm_finishes_in_flight_requests_and_exits_0(busy_server):
    core = _engine_core_pid(busy_server.proc.pid)
    stream = busy_server.client().completions.create(model=MODEL_NAME, prompt="Story:", max_tokens=40,
                                                     stream=True, extra_body={"ignore_eos": True},
                                                     stream_options={"include_usage": True})
    chunks = [next(iter(stream))]
    busy_server.proc.send_signal(signal.SIGTERM)
    chunks += list(stream)
    assert chunks[-1].usage.completion_tokens == 40
    assert busy_server.proc.wait(timeout=60) == 0
    assert not Path(f"/proc/{core}").exists()  # stopped and reaped by the server before it exited
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{busy_server.url}/health")


def _engine_core_pid(server_pid: int) -> int:
    """The server's engine core process (its other child is multiprocessing's resource tracker)."""
    children = [int(pid) for f in Path(f"/proc/{server_pid}/task").glob("*/children") for pid in f.read_text().split()]
    [core] = [pid for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    return core


def test_bench_serve_against_our_server(server, tmp_path):
    from martlet.bench import serve as bench

    workload = tmp_path / "workload.jsonl"
    workload.write_text("".join(json.dumps({"input_len": i, "output_len": o}) + "\n" for i, o in [(5, 4), (9, 6)]))
    out = tmp_path / "result.json"
    assert bench.main(["--base-url", server.url, "--workload", str(workload), "--num-prompts", "6",
                       "--api-key", API_KEY, "--json", str(out), "--seed", "1"]) == 0
    result = json.loads(out.read_text())
    assert result["completed"] == 6 and result["failed"] == 0
    assert result["total_output_tokens"] == 4 * 3 + 6 * 3
    assert result["output_throughput"] > 0 and result["ttft_ms"]["p50"] > 0 and result["engine_steps_per_s"] > 0
    # Every request of two choices, half of them structured (which may end before their output_len).
    assert bench.main(["--base-url", server.url, "--workload", str(workload), "--num-prompts", "4", "--n", "2",
                       "--json-schema-fraction", "0.5", "--api-key", API_KEY, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["completed"] == 4 and result["failed"] == 0 and result["total_output_tokens"] > 4
