"""Where a step's time goes on the GPU: kernel time by kernel, and the host time around it.

    python3 benchmarks/profile_steps.py [--config-dir DIR] [--case b1|b256|sharegpt ...]

For each case, a window of engine steps runs under torch.profiler; printed: wall ms per step,
the time the device was busy (the rest it waited on the host), and the top kernels.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from martlet import LLM
from martlet.bench.offline import exact_params, random_prompts
from martlet.kernels import pdl

# (batch, input, output); a case whose output is longer than 64 is profiled over its last 40 steps
# "b32mid": the b32 1024/1024 row at its mean context, 1536 tokens.
CASES = {"b1": (1, 8, 64), "b1long": (1, 8, 256), "b256": (256, 8, 64), "b256ctx": (256, 200, 64),
         "b32long": (32, 1024, 32), "b32mid": (32, 1536, 48)}


def timed(obj: object, name: str, totals: dict[str, float]) -> None:
    """Wrap obj.name to add its host wall time to totals[name]."""
    fn = getattr(obj, name)

    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[name] = totals.get(name, 0.0) + time.perf_counter() - t

    setattr(obj, name, wrapper)


def device_activity(events) -> tuple[float, list[tuple[float, str, str]]]:
    """The device's busy time (the union of its kernels' and copies' intervals, us) and every stretch
    with nothing running on it: (us, the activity before, the one after)."""
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in events if e.device_type == DeviceType.CUDA)
    if not spans:
        return 0.0, []
    gaps, reach, last = [], spans[0][1], spans[0][2]
    for start, end, name in spans[1:]:
        if start > reach:
            gaps.append((start - reach, last, name))
        if end > reach:
            reach, last = end, name
    return reach - spans[0][0] - sum(g[0] for g in gaps), gaps


def print_idle(gaps: list[tuple[float, str, str]], steps: int) -> None:
    """Idle device time split by gap length: many short gaps are launch latency, a few long ones are the
    host falling behind."""
    for lo, hi in ((0, 5), (5, 50), (50, 500), (500, float("inf"))):
        sel = [g for g in gaps if lo <= g[0] < hi]
        print(f"idle gaps {lo}-{hi} us: {len(sel) / steps:.1f} per step, "
              f"{sum(g[0] for g in sel) / steps / 1e3:.3f} ms/step")
    for us, before, after in sorted(gaps, reverse=True)[:8]:
        print(f"  {us:8.1f} us after {before[:50]} before {after[:50]}")


def profile_steps(llm: LLM, prompts: list[dict], outs: list[int], skip_steps: int, steps: int) -> None:
    """Device activity only is traced, so the host runs at its usual pace and idle device time shows."""
    engine = llm.engine
    for i, (p, n) in enumerate(zip(prompts, outs)):
        engine.add_request(p["prompt_token_ids"], exact_params(n), request_id=f"r{i}")
    for _ in range(skip_steps):
        engine.step("final")
    totals: dict[str, float] = {}
    for obj, name in ((engine.scheduler, "schedule"), (engine.runner, "_plan"), (engine.runner, "execute"),
                      (engine.runner, "sampler"), (engine, "_check_finished")):
        timed(obj, name, totals)
    window: list[tuple[int, int, int]] = []  # per step: decodes, their context tokens, prefill tokens
    engine.on_step = lambda b: window.append((len(b.seqs) - b.num_prefills,
                                              sum(len(s) for s in b.seqs[b.num_prefills:]),
                                              sum(b.num_new_tokens[: b.num_prefills])))
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            engine.step("final")
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    engine.on_step = None
    print("host ms/step:", {k: round(1e3 * v / steps, 2) for k, v in totals.items()})
    while engine.has_unfinished_requests():
        engine.step("final")
    busy, gaps = device_activity(prof.events())
    print(f"wall {1e3 * wall / steps:.2f} ms/step, device busy {busy / 1e3 / steps:.2f} ms/step "
          f"({100 * busy / 1e6 / wall:.0f}%); {sum(w[2] for w in window) / steps:.0f} prefill tokens and "
          f"{sum(w[0] for w in window) / steps:.0f} decodes per step")
    print_idle(gaps, steps)
    runner = engine.runner  # K/V bytes as the cache stores them (8-bit codes and their scales)
    kv_bytes = sum(w[1] for w in window) * runner.kv_bytes_per_block() / runner.block_size
    events = prof.key_averages()
    decode_us = sum(e.self_device_time_total for e in events if e.key == "_decode_kernel")
    if decode_us:
        print(f"decode attention: {kv_bytes / 1e9:.1f} GB of K/V in {decode_us / 1e3:.1f} ms, "
              f"{kv_bytes / decode_us / 1e3:,.0f} GB/s")
    print(events.table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=60))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config-dir", default="benchmarks/models/llama-2-7b")
    ap.add_argument("--case", nargs="*", default=["b1", "b256", "sharegpt"])
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--quantization", default=None)
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--no-pdl", action="store_true",
                    help="launch each kernel after the one before ends: with PDL a kernel's time includes its wait")
    args = ap.parse_args()
    pdl.ENABLED = not args.no_pdl
    llm = LLM(args.config_dir, load_format="dummy", dtype="float16", max_model_len=2304, quiet=True,
              enforce_eager=args.enforce_eager, quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype)
    vocab = llm.engine.model_config.vocab_size
    for case in args.case:
        print(f"===== {case}", flush=True)
        if case == "sharegpt":
            rows = [json.loads(x) for x in open("benchmarks/workloads/sharegpt_like_1024.jsonl")]
            prompts = random_prompts([r["input_len"] for r in rows], vocab)
            profile_steps(llm, prompts, [r["output_len"] for r in rows], skip_steps=200, steps=60)
        else:
            batch, input_len, output_len = CASES[case]
            prompts = random_prompts([input_len] * batch, vocab)
            llm.generate(prompts, exact_params(output_len), use_tqdm=False)  # warm-up: graphs captured
            profile_steps(llm, prompts, [output_len] * batch, skip_steps=8 if output_len <= 64 else output_len - 40,
                          steps=30)


if __name__ == "__main__":
    main()
