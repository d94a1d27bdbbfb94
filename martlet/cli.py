"""`martlet generate | chat | serve | bench ...`: the command line.

Every command that builds an engine takes the same engine options as `LLM(...)`.
"""

from __future__ import annotations

import argparse
import logging
import sys

from martlet.config import KV_CACHE_DTYPES, QUANTIZATIONS
from martlet.sampling_params import SamplingParams


def add_engine_args(parser: argparse.ArgumentParser, model_required: bool = False) -> None:
    g = parser.add_argument_group("engine")
    g.add_argument("--model", required=model_required,
                   help="Hugging Face model directory or .gguf file (default: SmolLM2-135M-Instruct GGUF)")
    g.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda")
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--max-num-seqs", type=int, default=256)
    g.add_argument("--max-num-batched-tokens", type=int, default=8192)
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--num-kv-blocks", type=int, default=None)
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"])
    g.add_argument("--attention-backend", default=None, choices=["torch", "triton"])
    g.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    g.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                   help="KV cache format: auto (the model's dtype), int8 or fp8 (8-bit, scaled per token and head)")
    g.add_argument("--quantization", "-q", default=None, choices=[q for q in QUANTIZATIONS if q],
                   help="quantize at load: int8 (weights per channel) or int4 (groupwise), weight-only; "
                        "fp8 or w8a8 (int8): 8-bit weights and activations")
    g.add_argument("--quiet", action="store_true", help="no progress bars or log lines")


def engine_kwargs(args: argparse.Namespace) -> dict:
    """The `LLM(...)` keyword arguments named by `add_engine_args`."""
    return dict(
        dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size, num_kv_blocks=args.num_kv_blocks,
        gpu_memory_utilization=args.gpu_memory_utilization, seed=args.seed,
        load_format=args.load_format, attention_backend=args.attention_backend,
        enforce_eager=args.enforce_eager, kv_cache_dtype=args.kv_cache_dtype, quantization=args.quantization,
        quiet=args.quiet,
    )


def model_path(args: argparse.Namespace) -> str:
    if args.model:
        return args.model
    from martlet.models.gguf import default_model_path

    return str(default_model_path())


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--sampling-seed", type=int, default=None, help="seed of this request's sampling")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.sampling_seed, stop=args.stop,
    )


def _load(args: argparse.Namespace):
    from martlet.llm import LLM

    return LLM(model_path(args), **engine_kwargs(args))


def stream_reply(llm, prompt: str, params: SamplingParams) -> str:
    """Print the reply as it is generated; return it whole."""
    printed = ""
    for out in llm.stream(prompt, params):
        text = out.outputs[0].text
        sys.stdout.write(text[len(printed) :])
        sys.stdout.flush()
        printed = text
    sys.stdout.write("\n")
    return printed


def cmd_generate(args: argparse.Namespace) -> None:
    llm = _load(args)
    stream_reply(llm, args.prompt, sampling_params(args))


def cmd_chat(args: argparse.Namespace) -> None:
    llm = _load(args)
    params = sampling_params(args)
    messages: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    print("Chatting with the model; an empty line or Ctrl-D ends the chat.", file=sys.stderr)
    while True:
        try:
            user = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            break
        if not user:
            break
        messages.append({"role": "user", "content": user})
        reply = stream_reply(llm, llm.apply_chat_template(messages), params)
        messages.append({"role": "assistant", "content": reply})


def _generate_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", required=True)
    add_engine_args(parser)
    add_sampling_args(parser)


def _chat_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--system", default=None, help="system prompt")
    add_engine_args(parser)
    add_sampling_args(parser)


def build_parser() -> argparse.ArgumentParser:
    # Imported here: the server and the serving bench import this module for the shared options.
    from martlet import server
    from martlet.bench import kernels, offline
    from martlet.bench import serve as bench_serve

    parser = argparse.ArgumentParser(prog="martlet", description="Martlet LLM inference engine")
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    for subparsers, name, help_text, add_args, run in [
        (commands, "generate", "generate text for one prompt, streamed to the terminal", _generate_args,
         cmd_generate),
        (commands, "chat", "interactive chat using the model's chat template", _chat_args, cmd_chat),
        (commands, "serve", "OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, /v1/models, "
         "/health, /metrics)", server.add_cli_args, server.run),
        (bench, "latency", "one batch start to finish: TTFT, ms per token, roofline", offline.add_latency_args,
         offline.run_latency),
        (bench, "throughput", "many requests through the engine: tok/s, roofline", offline.add_throughput_args,
         offline.run_throughput),
        (bench, "serve", "load an OpenAI-compatible server: TTFT, TPOT, ITL, tok/s", bench_serve.add_cli_args,
         bench_serve.run),
        (bench, "kernels", "Triton kernels against the GPU's ceilings and SDPA", kernels.add_cli_args, kernels.run),
    ]:
        command = subparsers.add_parser(name, help=help_text)
        add_args(command)
        command.set_defaults(func=run)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    quiet = getattr(args, "quiet", False)
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")
    try:
        code = args.func(args)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"martlet: error: {e}")
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
