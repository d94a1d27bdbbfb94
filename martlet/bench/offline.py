"""`martlet bench latency` and `martlet bench throughput`: the engine alone, no server.

Prompts are random token ids of the asked lengths; every request generates exactly its output
length (greedy, EOS ignored), so runs are comparable across engines. Both commands measure the
copy-bandwidth and GEMM ceilings first and report the run's time against its roofline
(see roofline.py).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch
from tqdm import tqdm

from martlet.bench.roofline import Ceilings, Roofline, StepCost, layer_weight_bytes, measure_ceilings, step_cost
from martlet.config import EngineArgs
from martlet.llm import LLM
from martlet.sampling_params import SamplingParams


def add_common_args(parser: argparse.ArgumentParser) -> None:
    # An alias of --model, so that the flags resolve to an EngineArgs before the command runs.
    parser.add_argument("--config-dir", dest="model", default=None, help="a model directory with only config.json "
                        "(use --load-format dummy); same as --model")
    parser.add_argument("--json", default=None, help="write the results to this file")
    EngineArgs.add_cli_args(parser)


def load_llm(args: argparse.Namespace) -> LLM:
    engine_args = EngineArgs.from_cli_args(args)
    return LLM(engine_args.model, **engine_args.engine_kwargs())


def random_prompts(lengths: list[int], vocab_size: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(10, vocab_size) for _ in range(n)]} for n in lengths]


def exact_params(output_len: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True, detokenize=False)


class Run:
    """Times one batch of requests through the engine and records the steps it took."""

    def __init__(self, llm: LLM, roofline: Roofline) -> None:
        self.llm = llm
        self.roofline = roofline

    def __call__(self, prompts: list[dict], output_lens: list[int], progress: bool) -> dict:
        costs: list[StepCost] = []
        engine = self.llm.engine
        engine.on_step = lambda batch: costs.append(step_cost(batch))
        params = [exact_params(n) for n in output_lens]
        hits_before = engine.block_manager.num_hit_tokens
        _sync(engine)
        start = time.perf_counter()
        outputs = self.llm.generate(prompts, params, use_tqdm=progress)
        _sync(engine)
        seconds = time.perf_counter() - start
        engine.on_step = None
        num_out = sum(len(o.outputs[0].token_ids) for o in outputs)
        num_in = sum(len(p["prompt_token_ids"]) for p in prompts)
        ideal = self.roofline.run_seconds(costs)
        ttfts = [o.metrics.first_token_time - start for o in outputs]
        return {
            "seconds": seconds, "requests": len(prompts), "input_tokens": num_in, "output_tokens": num_out,
            "steps": len(costs), "requests_per_s": len(prompts) / seconds, "output_tok_s": num_out / seconds,
            "total_tok_s": (num_in + num_out) / seconds, "ttft_ms": 1e3 * statistics.median(ttfts),
            "roofline_seconds": ideal, "roofline_pct": 100 * ideal / seconds,
            "preemptions": sum(o.metrics.num_preemptions for o in outputs),
            "prefix_cache_hit_tokens": engine.block_manager.num_hit_tokens - hits_before,
            "spec_steps": sum(o.metrics.num_spec_steps for o in outputs),
            "spec_draft_tokens": sum(o.metrics.num_draft_tokens for o in outputs),
            "spec_accepted_tokens": sum(o.metrics.num_accepted_tokens for o in outputs),
        }


def _speculation_summary(result: dict) -> str:
    """Acceptance rate and tokens per verification step (vLLM's mean acceptance length)."""
    steps, drafts, accepted = result["spec_steps"], result["spec_draft_tokens"], result["spec_accepted_tokens"]
    if not steps:
        return "no proposals verified"
    return (f"{accepted:,} of {drafts:,} proposed tokens accepted ({accepted / drafts:.1%}), "
            f"{1 + accepted / steps:.2f} tokens per verification step")


def _sync(engine) -> None:
    if engine.config.device.type == "cuda":
        torch.cuda.synchronize()


def _setup(args: argparse.Namespace) -> tuple[LLM, Run, Ceilings]:
    llm = load_llm(args)
    cfg, dtype = llm.engine.model_config, llm.engine.config.dtype
    print("measuring ceilings (copy bandwidth, GEMM) ...", flush=True)
    ceilings = measure_ceilings(llm.engine.config.device, dtype, llm.engine.config.quantization)
    gemm = llm.engine.config.quantization if llm.engine.config.quantization in ("fp8", "w8a8") else dtype
    print(f"{ceilings.device}: copy {ceilings.copy_gb_s:,.0f} GB/s, {gemm} GEMM {ceilings.gemm_tflops:,.1f} "
          f"TFLOP/s", flush=True)
    # Weight and K/V bytes as stored: a quantized format's own (codes, scales, offsets), not the dtype's.
    runner = llm.engine.runner
    roofline = Roofline(cfg, dtype, ceilings, layer_weight_bytes(runner.model),
                        runner.kv_bytes_per_block() // runner.block_size, runner.tp_size)
    return llm, Run(llm, roofline), ceilings


def _report(args: argparse.Namespace, llm: LLM, ceilings: Ceilings, rows: list[tuple[str, str]],
            result: dict) -> None:
    engine = llm.engine.config
    kv_tokens = llm.engine.block_manager.num_blocks * engine.block_size
    kv_gib = llm.engine.runner.kv_cache.nbytes / 2**30
    rows = [*rows, ("KV cache", f"{engine.kv_cache_dtype}: {kv_tokens:,} tokens in {kv_gib:.2f} GiB")]
    if engine.speculative_config is not None:
        rows.append(("speculation", _speculation_summary(result)))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    if args.json:
        result.update(ceilings=ceilings.as_dict(), model=engine.model, dtype=str(engine.dtype),
                      enforce_eager=engine.enforce_eager, kv_blocks=llm.engine.block_manager.num_blocks,
                      kv_cache_dtype=engine.kv_cache_dtype, kv_cache_tokens=kv_tokens, kv_cache_gib=kv_gib)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


# ---- latency ---------------------------------------------------------------------------------------


def add_latency_args(parser: argparse.ArgumentParser) -> None:
    add_common_args(parser)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--num-iters", type=int, default=3, help="timed iterations (the median is reported)")
    parser.add_argument("--num-iters-warmup", type=int, default=1)


def run_latency(args: argparse.Namespace) -> dict:
    """One batch of `batch_size` prompts of equal length, start to finish; the median of a few iterations.

    Every iteration draws new prompts: the same ones again would be served from the prefix cache,
    and the timed iterations would skip their prefill.
    """
    llm, run, ceilings = _setup(args)
    vocab = llm.engine.model_config.vocab_size
    outs = [args.output_len] * args.batch_size

    def iteration(seed: int) -> dict:
        return run(random_prompts([args.input_len] * args.batch_size, vocab, seed), outs, progress=False)

    warmups = args.num_iters_warmup
    for seed in tqdm(range(warmups), desc="Warm-up", disable=args.quiet):
        iteration(seed)
    iters = [iteration(warmups + i) for i in tqdm(range(args.num_iters), desc="Timing", disable=args.quiet)]
    result = sorted(iters, key=lambda r: r["seconds"])[len(iters) // 2]
    decode_steps = max(args.output_len - 1, 1)
    result["ms_per_output_token"] = 1e3 * (result["seconds"] - result["ttft_ms"] / 1e3) / decode_steps
    result["iterations_s"] = [r["seconds"] for r in iters]
    result.update(batch_size=args.batch_size, input_len=args.input_len, output_len=args.output_len)
    _report(args, llm, ceilings, [
        ("batch / in / out", f"{args.batch_size} / {args.input_len} / {args.output_len}"),
        ("total latency", f"{result['seconds']:.3f} s (median of {args.num_iters})"),
        ("time to first token", f"{result['ttft_ms']:.1f} ms"),
        ("per output token", f"{result['ms_per_output_token']:.2f} ms"),
        ("output throughput", f"{result['output_tok_s']:,.1f} tok/s"),
        ("prefix-cache hits", f"{result['prefix_cache_hit_tokens']} prompt tokens"),
        ("roofline", f"{result['roofline_seconds']:.3f} s = {result['roofline_pct']:.1f}% achieved"),
    ], result)
    return result


# ---- throughput ------------------------------------------------------------------------------------


def add_throughput_args(parser: argparse.ArgumentParser) -> None:
    add_common_args(parser)
    parser.add_argument("--workload", default=None, help='JSONL of {"input_len", "output_len"} per request')
    parser.add_argument("--num-prompts", type=int, default=None)
    parser.add_argument("--input-len", type=int, default=None)
    parser.add_argument("--output-len", type=int, default=None)


def workload_lengths(args: argparse.Namespace) -> tuple[list[int], list[int]]:
    if args.workload:
        with open(args.workload) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        rows = rows[: args.num_prompts] if args.num_prompts else rows
        return [r["input_len"] for r in rows], [r["output_len"] for r in rows]
    if not (args.num_prompts and args.input_len and args.output_len):
        raise ValueError("give --workload FILE, or all of --num-prompts, --input-len and --output-len")
    return [args.input_len] * args.num_prompts, [args.output_len] * args.num_prompts


def run_throughput(args: argparse.Namespace) -> dict:
    ins, outs = workload_lengths(args)
    llm, run, ceilings = _setup(args)
    prompts = random_prompts(ins, llm.engine.model_config.vocab_size)
    run(prompts[:1], [4], progress=False)  # warm-up: kernels compiled, first graphs captured
    result = run(prompts, outs, progress=not args.quiet)
    result.update(workload=args.workload, mean_input_len=statistics.mean(ins), mean_output_len=statistics.mean(outs))
    _report(args, llm, ceilings, [
        ("requests", f"{result['requests']} (mean in {result['mean_input_len']:.0f}, "
                     f"out {result['mean_output_len']:.0f} tokens)"),
        ("elapsed", f"{result['seconds']:.2f} s over {result['steps']} steps"),
        ("requests/s", f"{result['requests_per_s']:.2f}"),
        ("output throughput", f"{result['output_tok_s']:,.1f} tok/s"),
        ("total throughput", f"{result['total_tok_s']:,.1f} tok/s"),
        ("preemptions", f"{result['preemptions']}"),
        ("prefix-cache hits", f"{result['prefix_cache_hit_tokens']} prompt tokens"),
        ("roofline", f"{result['roofline_seconds']:.2f} s = {result['roofline_pct']:.1f}% achieved"),
    ], result)
    return result
