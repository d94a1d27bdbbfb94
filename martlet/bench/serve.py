"""`martlet bench serve`: load an OpenAI-compatible server as clients would, and time it.

    martlet bench serve --base-url http://127.0.0.1:8000 --workload W.jsonl [--request-rate R | --max-concurrency C]

Each workload line is {"input_len": I, "output_len": O}. Every request sends I random token ids as
its prompt to /v1/completions and streams exactly O tokens back (`ignore_eos`, `min_tokens`: vLLM's
extensions, which Martlet shares), so any server that speaks them, ours or vLLM, does the same work.
Requests arrive as a Poisson process at R per second (all at once when R is inf), at most C in
flight. Reported: request and token throughput, and time to first token (TTFT), time per output
token after the first (TPOT), inter-token latency (ITL, between one choice's streamed chunks) and
end-to-end latency, each as mean and p50/p90/p99 in milliseconds.

Request kinds for the serving features (they need a server whose model has a tokenizer):
`--n N` asks for N choices of each prompt in one request, `--copies K` sends each prompt as K
separate requests instead (the two compare prompt sharing), `--n-fraction` applies --n to only
that share of requests, and `--json-schema-fraction` makes that share structured: they follow
JSON_SCHEMA (one long string, so they run to max_tokens like the others) and end when the grammar
lets them, without ignore_eos or min_tokens, which would fight the grammar's end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from tqdm import tqdm

PERCENTILES = (50, 90, 99)
JSON_SCHEMA = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}


@dataclass
class Request:
    prompt: list[int]
    output_len: int
    n: int = 1
    structured: bool = False


@dataclass
class Result:
    ok: bool = False
    error: str = ""
    ttft: float = 0.0  # seconds from sending to the first streamed token
    latency: float = 0.0  # seconds from sending to the last
    itl: list[float] = field(default_factory=list)  # seconds between a choice's streamed chunks
    output_tokens: int = 0

    @property
    def tpot(self) -> float | None:
        return (self.latency - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (without /v1)")
    parser.add_argument("--workload", required=True, help="JSONL of {\"input_len\", \"output_len\"}")
    parser.add_argument("--num-prompts", type=int, default=None, help="requests to send (default: one per line)")
    parser.add_argument("--request-rate", type=float, default=math.inf, help="Poisson arrivals per second")
    parser.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight at once")
    parser.add_argument("--model", default=None, help="model name to ask for (default: the server's first)")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="sent as a Bearer token")
    parser.add_argument("--vocab-size", type=int, default=32000, help="prompt token ids are drawn below this")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--n", type=int, default=1, help="choices per request")
    parser.add_argument("--n-fraction", type=float, default=1.0, help="share of requests that ask for --n choices")
    parser.add_argument("--copies", type=int, default=1, help="send each prompt as this many separate requests")
    parser.add_argument("--json-schema-fraction", type=float, default=0.0,
                        help="share of requests constrained to a JSON schema")
    parser.add_argument("--seed", type=int, default=0, help="seed of prompts and arrival times")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for any one read")
    parser.add_argument("--json", default=None, help="write the results here")
    return parser


def load_workload(path: str, num_prompts: int | None, vocab_size: int, rng: random.Random,
                  args: argparse.Namespace) -> list[Request]:
    """The first `num_prompts` lines (cycled if there are fewer), each with a random prompt, of the
    kinds `args` asks for (each prompt --copies times)."""
    lines = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path} holds no requests")
    count = num_prompts if num_prompts is not None else len(lines)
    rows = [lines[i % len(lines)] for i in range(count)]
    requests = []
    for r in rows:
        # Ids from 10 up skip the special tokens at the bottom of most vocabularies.
        request = Request([rng.randrange(10, vocab_size) for _ in range(r["input_len"])], r["output_len"])
        # Draws only for the kinds asked for, so a plain run's prompts are those of earlier versions.
        request.n = args.n if args.n > 1 and rng.random() < args.n_fraction else 1
        request.structured = args.json_schema_fraction > 0 and rng.random() < args.json_schema_fraction
        requests += [request] * args.copies
    return requests


async def send(client: httpx.AsyncClient, url: str, payload: dict) -> Result:
    """One streamed completion, timed chunk by chunk (and choice by choice)."""
    result = Result()
    start = last = time.perf_counter()
    last_of_choice: dict[int, float] = {}
    try:
        async with client.stream("POST", url, json=payload) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread()).decode()[:200]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: "):])
                if "error" in chunk:
                    result.error = str(chunk["error"])
                    return result
                now = time.perf_counter()
                for choice in chunk.get("choices") or []:
                    if last == start:
                        result.ttft = now - start
                    if choice["index"] in last_of_choice:
                        result.itl.append(now - last_of_choice[choice["index"]])
                    last = last_of_choice[choice["index"]] = now
                    result.output_tokens += 1  # a fallback, for servers that send no usage
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.latency = last - start
    result.ok = True
    return result


async def run_benchmark(
    args: argparse.Namespace, requests: list[Request], rng: random.Random,
) -> tuple[list[Result], float, float | None]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.max_concurrency, max_keepalive_connections=args.max_concurrency)
    async with httpx.AsyncClient(base_url=args.base_url, headers=headers, limits=limits,
                                 timeout=httpx.Timeout(args.timeout)) as client:
        model = args.model or await first_model(client)
        gate = asyncio.Semaphore(args.max_concurrency or len(requests))
        bar = tqdm(total=len(requests), desc="Requests", unit="req")

        async def one(request: Request) -> Result:
            payload = {
                "model": model, "prompt": request.prompt, "max_tokens": request.output_len,
                "temperature": args.temperature, "stream": True, "stream_options": {"include_usage": True},
            }
            if request.n > 1:
                payload["n"] = request.n
            if request.structured:
                payload["structured_outputs"] = {"json": JSON_SCHEMA}
            else:
                payload |= {"min_tokens": request.output_len, "ignore_eos": True}
            async with gate:
                result = await send(client, "/v1/completions", payload)
            bar.update(1)
            return result

        steps_before = await engine_steps(client)
        start = time.perf_counter()
        tasks = []
        for request in requests:
            tasks.append(asyncio.create_task(one(request)))
            if args.request_rate != math.inf:
                await asyncio.sleep(rng.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        bar.close()
        steps_after = await engine_steps(client)
    steps_per_s = None if steps_before is None or steps_after is None else (steps_after - steps_before) / duration
    return results, duration, steps_per_s


async def first_model(client: httpx.AsyncClient) -> str:
    response = await client.get("/v1/models")
    response.raise_for_status()
    return response.json()["data"][0]["id"]


async def engine_steps(client: httpx.AsyncClient) -> float | None:
    """Martlet's engine step counter, to compare the step rate under HTTP load with offline runs."""
    try:
        metrics = (await client.get("/metrics")).text
    except httpx.HTTPError:
        return None
    found = re.search(r"^martlet_engine_steps_total (\S+)$", metrics, re.M)
    return float(found[1]) if found else None


def summarize(requests: list[Request], results: list[Result], duration: float, steps_per_s: float | None) -> dict:
    done = [(q, r) for q, r in zip(requests, results) if r.ok]
    output_tokens = sum(r.output_tokens for _, r in done)
    input_tokens = sum(len(q.prompt) for q, _ in done)
    errors = sorted({r.error for r in results if not r.ok})
    return {
        "duration_s": duration,
        "completed": len(done),
        "failed": len(results) - len(done),
        "errors": errors[:10],
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(done) / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
        "engine_steps_per_s": steps_per_s,  # None for servers other than Martlet
        "ttft_ms": _stats([r.ttft for _, r in done]),
        "tpot_ms": _stats([r.tpot for _, r in done if r.tpot is not None]),
        "itl_ms": _stats([gap for _, r in done for gap in r.itl]),
        "e2el_ms": _stats([r.latency for _, r in done]),
    }


def _stats(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds, dtype=float) * 1000.0
    if ms.size == 0:
        return {"mean": 0.0, **{f"p{p}": 0.0 for p in PERCENTILES}}
    return {"mean": float(ms.mean()), **{f"p{p}": float(np.percentile(ms, p)) for p in PERCENTILES}}


def print_table(summary: dict) -> None:
    rows = [
        ("Successful requests", f"{summary['completed']}"),
        ("Failed requests", f"{summary['failed']}"),
        ("Benchmark duration (s)", f"{summary['duration_s']:.2f}"),
        ("Total input tokens", f"{summary['total_input_tokens']}"),
        ("Total output tokens", f"{summary['total_output_tokens']}"),
        ("Request throughput (req/s)", f"{summary['request_throughput']:.2f}"),
        ("Output token throughput (tok/s)", f"{summary['output_throughput']:.2f}"),
        ("Total token throughput (tok/s)", f"{summary['total_token_throughput']:.2f}"),
    ]
    if summary["engine_steps_per_s"] is not None:
        rows.append(("Engine steps/s", f"{summary['engine_steps_per_s']:.2f}"))
    for key, title in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2el_ms", "E2E latency")):
        rows += [(f"{title} {stat} (ms)", f"{value:.2f}") for stat, value in summary[key].items()]
    width = max(len(name) for name, _ in rows) + 12
    print("=" * width)
    print("Serving benchmark result".center(width))
    print("=" * width)
    for name, value in rows:
        print(f"{name:<{width - 12}}{value:>12}")
    print("=" * width)
    for error in summary["errors"]:
        print(f"error: {error}")


def run(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    requests = load_workload(args.workload, args.num_prompts, args.vocab_size, rng, args)
    results, duration, steps_per_s = asyncio.run(run_benchmark(args, requests, rng))
    summary = summarize(requests, results, duration, steps_per_s)
    print_table(summary)
    if args.json:
        config = {k: getattr(args, k) for k in ("base_url", "workload", "num_prompts", "max_concurrency", "seed", "n",
                                                "n_fraction", "copies", "json_schema_fraction")}
        config["request_rate"] = str(args.request_rate) if math.isinf(args.request_rate) else args.request_rate
        Path(args.json).write_text(json.dumps({**config, "num_requests": len(requests), **summary}, indent=1))
    return 0 if summary["completed"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = add_cli_args(argparse.ArgumentParser(prog="martlet bench serve", description=__doc__.splitlines()[0]))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
