"""Structured output's cost in the engine alone (no server): 64 requests at once, each following a
JSON schema of one long string, against the same requests unconstrained, with the time of each
step and, on a GPU, where one step's host and device time go (torch.profiler): the device's idle
gaps between kernels show the host falling behind.

    PYTHONPATH=$PWD python3 benchmarks/structured_offline.py --model DIR [--json FILE] [--trace PREFIX]

DIR holds config.json and a tokenizer (gpu_serving_checks.sh builds build/llama-2-7b-smollm2-vocab:
Llama-2-7B's shapes with SmolLM2's tokenizer); the weights are dummy. The server's check runs the
same comparison through HTTP (json_schema against unconstrained at 64 in flight, issue 23: >= 0.9).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from profile_steps import device_activity, print_idle, timed  # this script's directory is on sys.path
from torch.profiler import ProfilerActivity, profile

from martlet import LLM, SamplingParams
from martlet.bench.serve import JSON_SCHEMA
from martlet.sampling_params import StructuredOutputsParams


def run(llm: LLM, prompts: list[str], params: SamplingParams) -> dict:
    engine = llm.engine
    launches: list[float] = []
    engine.on_step = lambda batch: launches.append(time.perf_counter())
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    engine.on_step = None
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    gaps = sorted(b - a for a, b in zip(launches, launches[1:]))
    return {"output_tokens": tokens, "seconds": seconds, "output_tok_s": tokens / seconds, "steps": len(launches),
            "ms_per_step_p50": 1e3 * gaps[len(gaps) // 2] if gaps else None}


def profile_steps(llm: LLM, prompts: list[str], params: SamplingParams, trace: str | None) -> None:
    """Ten steps in the middle of a run: wall and device-busy time per step, the device's idle gaps, the
    host time of the step's parts, and the top kernels; their Chrome trace to `trace`. Only device
    activity is traced, so the host runs at its usual pace and idle device time shows."""
    engine, steps = llm.engine, 10
    for prompt in prompts:
        engine.add_request(engine.tokenize(prompt), params)
    for _ in range(20):  # past the prefill
        engine.step()
    totals: dict[str, float] = {}
    parts = [(engine.scheduler, "schedule"), (engine.runner, "execute"), (engine, "_collect")]
    if engine.structured is not None:
        parts.append((engine.structured, "bitmask"))
    for obj, name in parts:
        timed(obj, name, totals)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    for obj, name in parts:
        delattr(obj, name)  # the instance's wrapper goes; the class's method shows again
    while engine.has_unfinished_requests():
        engine.step()
    if trace:
        prof.export_chrome_trace(trace)
    busy, gaps = device_activity(prof.events())
    print("host ms/step:", {k: round(1e3 * v / steps, 2) for k, v in totals.items()})
    print(f"wall {1e3 * wall / steps:.2f} ms/step, device busy {busy / 1e3 / steps:.2f} ms/step")
    print_idle(gaps, steps)
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=60))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--max-model-len", type=int, default=2304)
    ap.add_argument("--json")
    ap.add_argument("--trace", help="write each kind's profiled steps as a Chrome trace: TRACE.<kind>.json")
    args = ap.parse_args()
    llm = LLM(args.model, load_format="dummy", dtype="float16" if torch.cuda.is_available() else "float32",
              max_model_len=args.max_model_len, max_num_seqs=args.num_requests, quiet=True)
    prompts = [f"Request {i}: write a long sentence about the sea." for i in range(args.num_requests)]
    kinds = {
        "unconstrained": SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True),
        "json_schema": SamplingParams(temperature=0, max_tokens=args.max_tokens,
                                      structured_outputs=StructuredOutputsParams(json=JSON_SCHEMA)),
    }
    llm.generate(prompts[:2], kinds["json_schema"], use_tqdm=False)  # warm-up: the grammar compiles
    results = {}
    for name, params in kinds.items():
        results[name] = run(llm, prompts, params)
        r = results[name]
        print(f"{name}: {r['output_tok_s']:,.1f} output tok/s, {r['output_tokens']} tokens in {r['steps']} steps, "
              f"{r['ms_per_step_p50']:.2f} ms a step (median)", flush=True)
    ratio = results["json_schema"]["output_tok_s"] / results["unconstrained"]["output_tok_s"]
    print(f"json_schema / unconstrained output tok/s: {ratio:.3f}")
    for name, params in kinds.items():
        if not torch.cuda.is_available():  # device time is what the profile is for
            break
        trace = f"{args.trace}.{name}.json" if args.trace else None
        print(f"== profile, {name}", flush=True)
        profile_steps(llm, prompts, params, trace)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
