"""`martlet generate | chat | serve | bench ...`: the command line.

Every command that builds an engine takes the same engine options as `LLM(...)`: `EngineArgs`'.
"""

from __future__ import annotations

import argparse
import logging
import sys

from martlet.config import EngineArgs
from martlet.sampling_params import SamplingParams


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

    engine_args = EngineArgs.from_cli_args(args)
    return LLM(engine_args.model, **engine_args.engine_kwargs())


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
    EngineArgs.add_cli_args(parser)
    add_sampling_args(parser)


def _chat_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--system", default=None, help="system prompt")
    EngineArgs.add_cli_args(parser)
    add_sampling_args(parser)


def build_parser() -> argparse.ArgumentParser:
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


def _run_node_if_not_first(args: argparse.Namespace) -> int | None:
    """`llm_engine.run_node_if_not_first` for a command with engine flags; None for the others."""
    if not hasattr(args, "node_rank"):
        return None
    from martlet.engine.llm_engine import run_node_if_not_first

    return run_node_if_not_first(args.node_rank, lambda: EngineArgs.from_cli_args(args))


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    quiet = getattr(args, "quiet", False)
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")
    try:
        code = _run_node_if_not_first(args)
        code = args.func(args) if code is None else code
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"martlet: error: {e}")
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
