"""Where a step's time goes on the GPU: kernel time by kernel, and the host time around it.

    python3 benchmarks/profile_steps.py [--config-dir DIR] [--case b1|b256|sharegpt ...]

For each case, a window of engine steps runs under torch.profiler; printed: wall ms per step,
GPU kernel ms per step (the rest is the GPU waiting on the host), and the top kernels.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.profiler import ProfilerActivity, profile

from martlet import LLM
from martlet.bench.offline import exact_params, random_prompts

CASES = {"b1": (1, 8, 64), "b256": (256, 8, 64), "b32long": (32, 1024, 32)}


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


def profile_steps(llm: LLM, prompts: list[dict], outs: list[int], skip_steps: int, steps: int) -> None:
    engine = llm.engine
    totals: dict[str, float] = {}
    for obj, name in ((engine.scheduler, "schedule"), (engine.runner, "_prepare"), (engine.runner, "execute"),
                      (engine.runner, "sampler"), (engine, "_check_finished")):
        timed(obj, name, totals)
    for i, (p, n) in enumerate(zip(prompts, outs)):
        engine.add_request(p["prompt_token_ids"], exact_params(n), request_id=f"r{i}")
    for _ in range(skip_steps):
        engine.step("final")
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            engine.step("final")
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    print("host ms/step (first 8 + window + rest):",
          {k: round(1e3 * v / (skip_steps + steps), 2) for k, v in totals.items()})
    while engine.has_unfinished_requests():
        engine.step("final")
    events = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in events)
    print(f"wall {1e3 * wall / steps:.2f} ms/step, GPU kernels {gpu_us / 1e3 / steps:.2f} ms/step "
          f"({100 * gpu_us / 1e6 / wall:.0f}% busy)")
    print(events.table(sort_by="self_device_time_total", row_limit=14, max_name_column_width=60))
    print(events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config-dir", default="benchmarks/models/llama-2-7b")
    ap.add_argument("--case", nargs="*", default=["b1", "b256", "sharegpt"])
    ap.add_argument("--enforce-eager", action="store_true")
    args = ap.parse_args()
    llm = LLM(args.config_dir, load_format="dummy", dtype="float16", max_model_len=2304, quiet=True,
              enforce_eager=args.enforce_eager)
    vocab = llm.engine.model_config.vocab_size
    for case in args.case:
        print(f"===== {case}", flush=True)
        if case == "sharegpt":
            rows = [json.loads(x) for x in open("benchmarks/workloads/sharegpt_like_1024.jsonl")][:600]
            prompts = random_prompts([r["input_len"] for r in rows], vocab)
            profile_steps(llm, prompts, [r["output_len"] for r in rows], skip_steps=60, steps=40)
        else:
            batch, input_len, output_len = CASES[case]
            prompts = random_prompts([input_len] * batch, vocab)
            llm.generate(prompts, exact_params(output_len), use_tqdm=False)  # warm-up: graphs captured
            profile_steps(llm, prompts, [output_len] * batch, skip_steps=8, steps=30)


if __name__ == "__main__":
    main()
