"""Speculative decoding on a GPU: what a verification step costs, and what n-gram and a draft model gain.

    PYTHONPATH=$PWD python3 benchmarks/spec_decode.py verify-cost [--config-dir DIR] [--json FILE]
    PYTHONPATH=$PWD python3 benchmarks/spec_decode.py ngram [--model GGUF] [--k 4 6 8] [--json FILE]
    PYTHONPATH=$PWD python3 benchmarks/spec_decode.py draft [--config-dir DIR] [--draft-layers N] [--json FILE]

(benchmarks/gpu_spec_decode.sh runs all three and the ShareGPT-like workload with speculation on and off.)

`verify-cost` (issue 22's first GPU check): dummy weights, batch 1, 8, 16 and 32, every sequence verifying k
proposals per step for k = 0..6 (k = 0 is a plain decode step); the proposals are random tokens,
so nearly all are rejected and each step makes one token per sequence. Prints ms per step and, from
it, the speedup a given acceptance rate would bring: a step that verifies k proposals accepted
with probability a makes (1 - a^(k+1)) / (1 - a) tokens on average.

`ngram` (the second): the real default model at batch 1 on copy-heavy prompts (repeat, or edit, a
passage of public text, workloads/copy_passages.txt), greedy, without n-gram speculation and with it
for each --k: output tok/s, the speedup, and the acceptance. Issue 22 asks for 1.8x or more.

`draft`: the dummy target drafted for by a dummy model of the target's shape cut to --draft-layers
layers (its config is written to a temporary directory), batch 1, 8, 16 and 32, greedy, k = 0..6: ms per
step, output tokens per step, the acceptance (dummy weights guess whatever they guess), ms per output
token against plain decoding, and the speedup a given acceptance rate would bring at the step's
measured cost (the draft's k decode steps run eagerly, without CUDA graphs).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import tempfile
import time
from pathlib import Path

import torch

from martlet import LLM, SamplingParams
from martlet.config import SpeculativeConfig
from martlet.engine.sequence import Sequence
from martlet.engine.speculative import Proposer

KS = range(7)
BATCHES = (1, 8, 16, 32)  # 32: speculative.MAX_SPECULATIVE_BATCH, above which no step speculates
STEPS = 64
ACCEPTANCE_RATES = (0.5, 0.7, 0.9)


class RandomProposer(Proposer):
    """k random tokens for every decoding sequence."""

    def __init__(self, config: SpeculativeConfig, max_model_len: int, vocab_size: int) -> None:
        super().__init__(config, max_model_len)
        self.vocab_size = vocab_size

    def _guess(self, seq: Sequence, k: int) -> list[int]:
        return [random.randrange(self.vocab_size) for _ in range(k)]


def expected_tokens(k: int, acceptance: float) -> float:
    return sum(acceptance**i for i in range(k + 1))


def verify_cost(args: argparse.Namespace) -> dict:
    llm = LLM(args.config_dir, load_format="dummy", dtype=args.dtype, quiet=True,
              speculative_config={"method": "ngram", "num_speculative_tokens": max(KS)})
    engine = llm.engine
    vocab = engine.model_config.vocab_size
    rows = []
    for batch in BATCHES:
        for k in KS:
            # k = 0 is the plain engine: no proposer, so the host stays a step ahead as it does without speculation.
            config = dataclasses.replace(engine.config.speculative_config, num_speculative_tokens=max(k, 1))
            engine.proposer = RandomProposer(config, engine.config.max_model_len, vocab) if k else None
            ms, _ = time_steps(engine, batch)
            rows.append({"batch": batch, "k": k, "ms_per_step": ms})
    for row in rows:
        base = next(r["ms_per_step"] for r in rows if r["batch"] == row["batch"] and r["k"] == 0)
        row["speedup_at"] = {a: expected_tokens(row["k"], a) * base / row["ms_per_step"] for a in ACCEPTANCE_RATES}
        gains = ", ".join(f"a={a}: {s:.2f}x" for a, s in row["speedup_at"].items())
        print(f"b{row['batch']} k={row['k']}: {row['ms_per_step']:.2f} ms/step ({row['ms_per_step'] / base:.2f}x a "
              f"decode step); speedup {gains}", flush=True)
    return {"config_dir": args.config_dir, "steps": STEPS, "rows": rows}


def time_steps(engine, batch: int) -> tuple[float, float]:
    """ms per step and output tokens per step over STEPS decode steps of `batch` random 128-token prompts
    (aborted after: a step that accepts every proposal makes k + 1 tokens)."""
    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=0, max_tokens=(max(KS) + 1) * (STEPS + 8), ignore_eos=True, detokenize=False)
    request_ids = [engine.add_request([random.randrange(vocab) for _ in range(128)], params) for _ in range(batch)]
    for _ in range(8):  # the prefill and a few steps of warm-up
        engine.step()
    _sync(engine)
    tokens = sum(len(seq) for seq in engine.scheduler.running)
    start = time.perf_counter()
    for _ in range(STEPS):
        engine.step()
    _sync(engine)
    ms = 1e3 * (time.perf_counter() - start) / STEPS
    tokens = sum(len(seq) for seq in engine.scheduler.running) - tokens
    for request_id in request_ids:
        engine.abort_request(request_id)
    while engine.has_unfinished_requests():
        engine.step()
    return ms, tokens / STEPS


def draft(args: argparse.Namespace) -> dict:
    config = json.loads((Path(args.config_dir) / "config.json").read_text())
    with tempfile.TemporaryDirectory() as draft_dir:
        (Path(draft_dir) / "config.json").write_text(json.dumps({**config, "num_hidden_layers": args.draft_layers}))
        llm = LLM(args.config_dir, load_format="dummy", dtype=args.dtype, quiet=True, max_model_len=2048,
                  speculative_config={"model": draft_dir, "num_speculative_tokens": max(KS)})
    engine = llm.engine
    proposer, rows = engine.proposer, []
    for batch in BATCHES:
        for k in KS:
            # k = 0: no proposals, so the host stays a step ahead as it does without speculation.
            proposer.config = dataclasses.replace(proposer.config, num_speculative_tokens=max(k, 1))
            engine.proposer = proposer if k else None
            drafts, accepted = engine.num_draft_tokens, engine.num_accepted_tokens
            ms, tokens = time_steps(engine, batch)
            drafts, accepted = engine.num_draft_tokens - drafts, engine.num_accepted_tokens - accepted
            rows.append({"batch": batch, "k": k, "ms_per_step": ms, "tokens_per_step": tokens,
                         "acceptance_rate": accepted / drafts if drafts else None})
    for row in rows:
        base = next(r for r in rows if r["batch"] == row["batch"] and r["k"] == 0)
        ms_per_token = row["ms_per_step"] * row["batch"] / row["tokens_per_step"]
        base_ms_per_token = base["ms_per_step"] * base["batch"] / base["tokens_per_step"]
        row["speedup"] = base_ms_per_token / ms_per_token
        row["speedup_at"] = {a: expected_tokens(row["k"], a) * base["ms_per_step"] / row["ms_per_step"]
                             for a in ACCEPTANCE_RATES}
        gains = ", ".join(f"a={a}: {s:.2f}x" for a, s in row["speedup_at"].items())
        accepted = "" if row["acceptance_rate"] is None else f", {row['acceptance_rate']:.1%} accepted"
        print(f"b{row['batch']} k={row['k']}: {row['ms_per_step']:.2f} ms/step, {row['tokens_per_step']:.2f} "
              f"tokens/step{accepted}, {row['speedup']:.2f}x plain tok/s; at this step cost {gains}", flush=True)
    return {"config_dir": args.config_dir, "draft_layers": args.draft_layers, "steps": STEPS, "rows": rows}


def copy_heavy_prompts(llm: LLM) -> list[str]:
    """Chat prompts that ask for a passage of public text back, as it is or lightly edited."""
    text = (Path(__file__).resolve().parent / "workloads" / "copy_passages.txt").read_text()
    passages = [p.strip() for p in text.split("\n\n") if p.strip()]
    asks = ["Repeat the following text exactly, word for word:",
            "Rewrite the following text with every sentence in the past tense, changing nothing else:"]
    return [llm.apply_chat_template([{"role": "user", "content": f"{ask}\n\n{passage}"}])
            for passage in passages for ask in asks]


def ngram(args: argparse.Namespace) -> dict:
    from martlet.models.gguf import default_model_path

    model = args.model or str(default_model_path())
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    configs = [None] + [{"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": args.lookup_max,
                         "prompt_lookup_min": 1} for k in args.k]
    runs = []
    for config in configs:
        llm = LLM(model, quiet=True, speculative_config=config)
        prompts = copy_heavy_prompts(llm)[: args.num_prompts]
        llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)  # warm-up
        tokens, seconds, accepted, drafts = 0, 0.0, 0, 0
        for prompt in prompts:  # batch 1: one request at a time
            start = time.perf_counter()
            out = llm.generate(prompt, params, use_tqdm=False)[0]
            seconds += time.perf_counter() - start
            tokens += len(out.outputs[0].token_ids)
            accepted += out.metrics.num_accepted_tokens
            drafts += out.metrics.num_draft_tokens
        run = {"speculative_config": config, "output_tokens": tokens, "seconds": seconds,
               "output_tok_s": tokens / seconds, "acceptance_rate": accepted / drafts if drafts else None}
        name = "plain" if config is None else f"n-gram k={config['num_speculative_tokens']}"
        gain = ""
        if runs:
            run["speedup"] = run["output_tok_s"] / runs[0]["output_tok_s"]
            gain = f", {accepted / drafts if drafts else 0:.1%} of proposals accepted, {run['speedup']:.2f}x plain"
        print(f"{name}: {tokens / seconds:,.1f} output tok/s over {len(prompts)} prompts{gain}", flush=True)
        runs.append(run)
        del llm
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return {"model": model, "max_tokens": args.max_tokens, "runs": runs}


def _sync(engine) -> None:
    if engine.config.device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="command", required=True)
    cost = sub.add_parser("verify-cost")
    cost.add_argument("--config-dir", default="benchmarks/models/llama-2-7b")
    cost.add_argument("--dtype", default="float16")
    gain = sub.add_parser("ngram")
    gain.add_argument("--model", default=None)
    gain.add_argument("--k", type=int, nargs="+", default=[4], help="proposals per step, one run each")
    gain.add_argument("--lookup-max", type=int, default=3, help="prompt_lookup_max")
    gain.add_argument("--max-tokens", type=int, default=256)
    gain.add_argument("--num-prompts", type=int, default=8)
    drafted = sub.add_parser("draft")
    drafted.add_argument("--config-dir", default="benchmarks/models/llama-2-7b")
    drafted.add_argument("--draft-layers", type=int, default=2)
    drafted.add_argument("--dtype", default="float16")
    for parser in (cost, gain, drafted):
        parser.add_argument("--json")
    args = ap.parse_args()
    result = {"verify-cost": verify_cost, "ngram": ngram, "draft": draft}[args.command](args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
