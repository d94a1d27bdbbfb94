"""`martlet serve`: an OpenAI-compatible HTTP server, with the engine stepping in a process of its own.

    python -m martlet.server --model PATH [--host 127.0.0.1] [--port 8000] [engine options]

`add_cli_args` and `run` let the `martlet` CLI mount this as a subcommand; `main` is the whole
program. The model loads before the port opens, so /health answers only once it can serve.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal

from martlet.config import EngineArgs

DEFAULT_MAX_BODY_BYTES = 8 << 20  # a request body over this is answered 413
DEAD_ENGINE_EXIT_DELAY = 2.0  # seconds a server whose engine died answers 503 before it exits


def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The server's options, then every engine option of `LLM` (--model among them)."""
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--served-model-name", default=None, help="name clients use (default: --model as given)")
    g.add_argument("--api-key", default=os.environ.get("MARTLET_API_KEY"),
                   help="require `Authorization: Bearer KEY` on /v1 (default: $MARTLET_API_KEY)")
    g.add_argument("--max-waiting", type=int, default=None,
                   help="answer 429 while this many requests wait for the batch (default: no limit)")
    g.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                   help="answer 413 to a request body larger than this (default: 8 MiB)")
    g.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="answer 400 to a prompt longer than this (default: max-model-len - 1)")
    g.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish after SIGTERM before they are aborted")
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    g.add_argument("--disable-access-log", action="store_true", help="do not log every HTTP request")
    EngineArgs.add_cli_args(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from martlet.server.api import build_app
    from martlet.server.async_engine import AsyncEngine, EngineStartupError
    from martlet.server.engine_core import LOG_FORMAT

    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    engine_args = EngineArgs.from_cli_args(args)
    model = engine_args.model
    try:
        engine = AsyncEngine(model, engine_args.engine_kwargs())
    except EngineStartupError as exc:
        logging.getLogger("martlet.server").error("the engine could not start: %s", exc)
        return 1
    try:
        app = build_app(engine, args.served_model_name or model, args.api_key, args.max_waiting,
                        args.max_body_bytes, args.max_prompt_tokens)
        # uvicorn shuts down gracefully on SIGTERM, then raises the signal again for the handler it
        # found: make that handler end the process with status 0, since the shutdown was clean.
        signal.signal(signal.SIGTERM, _exit_cleanly)
        server = uvicorn.Server(uvicorn.Config(
            app, host=args.host, port=args.port, log_level=args.log_level, access_log=not args.disable_access_log,
            timeout_graceful_shutdown=args.shutdown_timeout))
        # A dead engine serves nothing more: after answering 503 for a moment, stop, and exit with 1.
        engine.on_death = lambda loop: loop.call_later(DEAD_ENGINE_EXIT_DELAY, setattr, server, "should_exit", True)
        server.run()
    finally:
        engine.shutdown()  # done already, unless uvicorn ended before its app did (say, the port was taken)
    return 1 if engine.died else 0


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    from martlet.engine.llm_engine import run_node_if_not_first

    parser = add_cli_args(argparse.ArgumentParser(prog="martlet serve", description=__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    code = run_node_if_not_first(args.node_rank, lambda: EngineArgs.from_cli_args(args))
    return run(args) if code is None else code
