"""Where a workload's time goes, step by step, against each step's roofline floor.

    PYTHONPATH=$PWD python3 benchmarks/step_times.py [--config-dir DIR] [--workload FILE] [--json FILE]

Runs the workload as `martlet bench throughput` does (dummy fp16 weights, greedy, exact output
lengths) and groups the steps by kind (decode only, or with prefill tokens) and by how many
sequences they carry. Per group: steps, seconds, ms per step, and the roofline floor of those
steps (`martlet.bench.roofline`). A step's time is the interval between two launches: with the
host one step ahead, the interval after step k+1's launch is what the device spent on step k.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from martlet import LLM
from martlet.bench.offline import exact_params, random_prompts
from martlet.bench.roofline import Roofline, measure_ceilings, step_cost

BATCH_GROUPS = [(1, 16), (17, 64), (65, 128), (129, 255), (256, 1 << 20)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config-dir", default="benchmarks/models/llama-2-7b")
    ap.add_argument("--workload", default="benchmarks/workloads/sharegpt_like_1024.jsonl")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--json")
    args = ap.parse_args()
    llm = LLM(args.config_dir, load_format="dummy", dtype=args.dtype, max_model_len=2304, quiet=True)
    engine = llm.engine
    ceilings = measure_ceilings(engine.config.device, engine.config.dtype)
    roofline = Roofline(engine.model_config, engine.config.dtype, ceilings)
    rows = [json.loads(line) for line in open(args.workload) if line.strip()]
    prompts = random_prompts([r["input_len"] for r in rows], engine.model_config.vocab_size)
    llm.generate(prompts[:1], exact_params(4), use_tqdm=False)  # warm-up

    steps: list[dict] = []

    def record(batch) -> None:
        steps.append({"launched": time.perf_counter(), "seqs": len(batch.seqs), "prefill": batch.num_prefills > 0,
                      "floor": roofline.step_seconds(step_cost(batch))})

    engine.on_step = record
    start = time.perf_counter()
    llm.generate(prompts, [exact_params(r["output_len"]) for r in rows], use_tqdm=False)
    if engine.config.device.type == "cuda":
        torch.cuda.synchronize()
    end = time.perf_counter()
    engine.on_step = None
    launches = [s["launched"] for s in steps] + [end]
    for k, s in enumerate(steps):  # step k's time: from step k+1's launch to step k+2's (or the end)
        s["seconds"] = launches[min(k + 2, len(steps))] - launches[min(k + 1, len(steps))]

    groups = {}
    for s in steps:
        lo, hi = next(g for g in BATCH_GROUPS if g[0] <= s["seqs"] <= g[1])
        key = ("with prefill" if s["prefill"] else "decode only", lo)
        g = groups.setdefault(key, {"sequences": f"{lo}-{hi}" if hi < 1 << 20 else f"{lo}+", "steps": 0,
                                    "seconds": 0.0, "floor": 0.0})
        g["steps"] += 1
        g["seconds"] += s["seconds"]
        g["floor"] += s["floor"]
    total = end - start
    print(f"{ceilings.device}: copy {ceilings.copy_gb_s:,.0f} GB/s, GEMM {ceilings.gemm_tflops:,.0f} TFLOP/s; "
          f"{len(steps)} steps in {total:.2f} s ({sum(r['output_len'] for r in rows) / total:,.1f} output tok/s)")
    print("| step kind | sequences | steps | seconds | share | ms/step | floor s | % of floor |")
    print("|---|---|---|---|---|---|---|---|")
    for (kind, _), g in sorted(groups.items()):
        print(f"| {kind} | {g['sequences']} | {g['steps']} | {g['seconds']:.2f} | {g['seconds'] / total:.0%} | "
              f"{1e3 * g['seconds'] / g['steps']:.2f} | {g['floor']:.2f} | {g['floor'] / g['seconds']:.0%} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ceilings": ceilings.as_dict(), "seconds": total, "steps": steps,
                       "groups": [{"kind": k, **g} for (k, _), g in sorted(groups.items())]}, f)


if __name__ == "__main__":
    main()
