"""Soak test: `martlet serve` at saturation for a bounded time with a mix of request kinds.

    python benchmarks/soak.py --duration 600 --concurrency 64 [--max-requests N] [--max-tokens 256] \
        [--json OUT.json] -- --model PATH [engine options of martlet serve]

It starts the server on a free loopback port (everything stays on 127.0.0.1), keeps
`--concurrency` clients busy until `--duration` seconds or `--max-requests` requests have passed,
each sending one of:

- stream: a streamed completion;
- whole: a chat completion, not streamed;
- abort: a streamed completion the client drops after a few chunks;
- json: a chat completion whose output must follow a JSON schema (it must parse if it stopped);
- n: a completion of three choices;
- tool: a chat completion that must call a tool (the call's arguments must parse).

Every `--sample-every` seconds it records the server's and the engine core's resident memory
(from /proc) and the engine's running and waiting requests and KV cache use (from /metrics). At
the end it waits for the server to go idle and reports: errors by kind, whether running requests
and KV use came back to 0, and memory growth from the end of the warm-up (the first tenth) to the
end. The exit status is 0 only if there were no errors and the server went back to idle.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

KINDS = {"stream": 3, "whole": 2, "abort": 2, "json": 2, "n": 1, "tool": 1}  # relative frequency
SCHEMA = {"type": "object", "properties": {"title": {"type": "string", "maxLength": 40},
                                           "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]},
                                                    "maxItems": 4}},
          "required": ["title", "year", "tags"]}
TOOLS = [{"type": "function", "function": {
    "name": "lookup", "parameters": {"type": "object", "required": ["query"],
                                     "properties": {"query": {"type": "string", "maxLength": 40}}}}}]
TOPICS = ["the sea", "a city at night", "winter", "a robot", "bread", "old maps", "rain", "the moon", "trains"]


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load (at most)")
    parser.add_argument("--max-requests", type=int, default=1_000_000, help="requests to send (at most)")
    parser.add_argument("--concurrency", type=int, default=64, help="clients sending back to back")
    parser.add_argument("--max-tokens", type=int, default=256, help="largest max_tokens of a request")
    parser.add_argument("--sample-every", type=float, default=10.0, help="seconds between memory samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the report here")
    return parser.parse_args(argv[:split]), argv[split + 1 :]


class Soak:
    def __init__(self, args: argparse.Namespace, url: str, server: subprocess.Popen) -> None:
        self.args = args
        self.url = url
        self.server = server
        self.rng = random.Random(args.seed)
        self.sent = Counter()
        self.errors: Counter[str] = Counter()
        self.examples: dict[str, str] = {}
        self.samples: list[dict] = []

    async def run(self) -> dict:
        deadline = time.monotonic() + self.args.duration
        async with httpx.AsyncClient(base_url=self.url, timeout=httpx.Timeout(300.0),
                                     limits=httpx.Limits(max_connections=self.args.concurrency + 4)) as client:
            self.model = (await client.get("/v1/models")).json()["data"][0]["id"]
            sampler = asyncio.create_task(self._sample(client))
            await asyncio.gather(*(self._client(client, deadline) for _ in range(self.args.concurrency)))
            sampler.cancel()
            idle, waited = await self._wait_idle(client)
            self.samples.append(await self._snapshot(client))
        return self._report(idle, waited)

    async def _client(self, client: httpx.AsyncClient, deadline: float) -> None:
        while time.monotonic() < deadline and sum(self.sent.values()) < self.args.max_requests:
            kind = self.rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
            self.sent[kind] += 1
            try:
                await getattr(self, f"_{kind}")(client, self.rng.randint(8, self.args.max_tokens))
            except Exception as exc:  # every failure is counted, and the soak goes on
                self.errors[kind] += 1
                self.examples.setdefault(kind, f"{type(exc).__name__}: {exc}"[:300])

    # ---- the request kinds: each raises on anything a client should not see --------------------

    def _prompt(self) -> str:
        return f"Write a few lines about {self.rng.choice(TOPICS)}."

    async def _post(self, client: httpx.AsyncClient, path: str, body: dict) -> dict:
        response = await client.post(path, json={"model": self.model, **body})
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
        return response.json()

    async def _events(self, client: httpx.AsyncClient, body: dict, limit: int | None = None) -> int:
        """Stream a completion; return the chunks read (stopping after `limit`, which drops it)."""
        chunks = 0
        async with client.stream("POST", "/v1/completions", json={"model": self.model, "stream": True, **body}) as r:
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}")
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    return chunks
                if "error" in json.loads(line[len("data: "):]):
                    raise RuntimeError(line[:300])
                chunks += 1
                if limit is not None and chunks >= limit:
                    return chunks  # leaving the block closes the connection mid-stream
        raise RuntimeError("the stream ended without [DONE]")

    async def _stream(self, client: httpx.AsyncClient, max_tokens: int) -> None:
        await self._events(client, {"prompt": self._prompt(), "max_tokens": max_tokens, "temperature": 0.8})

    async def _abort(self, client: httpx.AsyncClient, max_tokens: int) -> None:
        await self._events(client, {"prompt": self._prompt(), "max_tokens": max_tokens + 64, "ignore_eos": True},
                           limit=self.rng.randint(1, 5))

    async def _whole(self, client: httpx.AsyncClient, max_tokens: int) -> None:
        reply = await self._post(client, "/v1/chat/completions", {
            "messages": [{"role": "user", "content": self._prompt()}], "max_tokens": max_tokens})
        assert reply["choices"][0]["finish_reason"] in ("stop", "length"), reply

    async def _json(self, client: httpx.AsyncClient, max_tokens: int) -> None:
        reply = await self._post(client, "/v1/chat/completions", {
            "messages": [{"role": "user", "content": f"Describe a book about {self.rng.choice(TOPICS)} as JSON."}],
            "max_tokens": max(max_tokens, 96), "temperature": 0.7,
            "response_format": {"type": "json_schema", "json_schema": {"name": "book", "schema": SCHEMA}}})
        choice = reply["choices"][0]
        if choice["finish_reason"] == "stop":
            json.loads(choice["message"]["content"])  # raises if the grammar let bad JSON through

    async def _n(self, client: httpx.AsyncClient, max_tokens: int) -> None:
        reply = await self._post(client, "/v1/completions", {"prompt": self._prompt(), "n": 3,
                                                             "max_tokens": max_tokens, "temperature": 1.0})
        assert sorted(c["index"] for c in reply["choices"]) == [0, 1, 2], reply

    async def _tool(self, client: httpx.AsyncClient, max_tokens: int) -> None:
        reply = await self._post(client, "/v1/chat/completions", {
            "messages": [{"role": "user", "content": f"Look up {self.rng.choice(TOPICS)}."}], "tools": TOOLS,
            "tool_choice": "required", "max_tokens": max(max_tokens, 64)})
        choice = reply["choices"][0]
        if choice["finish_reason"] == "tool_calls":
            for call in choice["message"]["tool_calls"]:
                json.loads(call["function"]["arguments"])

    # ---- watching the server -------------------------------------------------------------------

    async def _sample(self, client: httpx.AsyncClient) -> None:
        while True:
            self.samples.append(await self._snapshot(client))
            await asyncio.sleep(self.args.sample_every)

    async def _snapshot(self, client: httpx.AsyncClient) -> dict:
        metrics = await _metrics(client)
        core = _engine_core_pid(self.server.pid)
        return {"t": time.monotonic(), "server_rss_mib": _rss_mib(self.server.pid),
                "engine_rss_mib": _rss_mib(core) if core else None,
                "running": metrics.get("martlet_num_requests_running"),
                "waiting": metrics.get("martlet_num_requests_waiting"),
                "kv_cache_usage": metrics.get("martlet_kv_cache_usage"), "sent": sum(self.sent.values())}

    async def _wait_idle(self, client: httpx.AsyncClient, timeout: float = 60.0) -> tuple[bool, float]:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            metrics = await _metrics(client)
            if metrics.get("martlet_num_requests_running") == 0 and metrics.get("martlet_kv_cache_usage") == 0:
                return True, time.monotonic() - start
            await asyncio.sleep(0.5)
        return False, timeout

    def _report(self, idle: bool, waited: float) -> dict:
        start = self.samples[0]["t"]
        warm = self.samples[max(1, len(self.samples) // 10)] if len(self.samples) > 1 else self.samples[0]
        end = self.samples[-1]
        return {
            "requests_by_kind": dict(self.sent), "errors_by_kind": dict(self.errors),
            "error_examples": self.examples, "errors": sum(self.errors.values()),
            "idle_at_end": idle, "seconds_to_idle": round(waited, 1),
            "end_running": end["running"], "end_kv_cache_usage": end["kv_cache_usage"],
            "server_rss_growth_mib": _growth(warm, end, "server_rss_mib"),
            "engine_rss_growth_mib": _growth(warm, end, "engine_rss_mib"),
            "samples": [{**s, "t": round(s["t"] - start, 1)} for s in self.samples],
        }


async def _metrics(client: httpx.AsyncClient) -> dict[str, float]:
    text = (await client.get("/metrics")).text
    return {name: float(value) for name, value in re.findall(r"^([^#\s]+) (\S+)$", text, re.M)}


def _engine_core_pid(server_pid: int) -> int | None:
    """The server's engine core process (its other child is multiprocessing's resource tracker)."""
    for children in Path(f"/proc/{server_pid}/task").glob("*/children"):
        for pid in children.read_text().split():
            cmdline = Path(f"/proc/{pid}/cmdline")
            if cmdline.exists() and b"spawn_main" in cmdline.read_bytes():
                return int(pid)
    return None


def _rss_mib(pid: int) -> float | None:
    status = Path(f"/proc/{pid}/status")
    found = re.search(r"^VmRSS:\s+(\d+) kB", status.read_text(), re.M) if status.exists() else None
    return round(int(found[1]) / 1024, 1) if found else None


def _growth(before: dict, after: dict, key: str) -> float | None:
    return None if before[key] is None or after[key] is None else round(after[key] - before[key], 1)


def start_server(serve_args: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "martlet.server", "--host", "127.0.0.1", "--port", str(port),
               "--disable-access-log", *serve_args]
    server = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return server, url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    server.kill()
    raise SystemExit(f"the server did not start; see {log}")


def main(argv: list[str] | None = None) -> int:
    args, serve_args = parse_args(argv)
    log = Path(args.json or "soak").with_suffix(".server.log")
    server, url = start_server(serve_args, log)
    try:
        report = asyncio.run(Soak(args, url, server).run())
    finally:
        server.send_signal(signal.SIGTERM)
        report_exit = server.wait(timeout=120)
    report["server_exit_code"] = report_exit
    for sample in report["samples"]:
        print(" ".join(f"{k}={v}" for k, v in sample.items()))
    print(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0 if report["errors"] == 0 and report["idle_at_end"] and report_exit == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
