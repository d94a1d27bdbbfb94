"""The engine core: an `LLMEngine` stepping in a process of its own, fed and read through pipes.

The server's front end (HTTP, tokenizing, detokenizing, stop strings) and the step loop each get
a process, so neither waits on the other's Python: at a few hundred streams the front end spends
more time writing chunks than the accelerator spends on a step, and sharing one GIL with it would
stall the loop. The channel between them is narrow:

- front end -> core: `AddRequest`, `AbortRequest`, `Shutdown`. A thread of the core reads them
  off the pipe as they come, so a burst of requests never fills the pipe and blocks the sender;
  the step loop takes them between steps, and sleeps on them when there is nothing to run.
- core -> front end: first `CoreReady` (or `CoreFailed` if the engine cannot be built), then one
  `StepOutputs` per step: every request's new tokens since the last message, and the scheduler's
  counts for /metrics. A `CoreFailed` is the last word of a core whose step loop broke.

The engine runs with `detokenize=False` and no stop strings: text is the front end's business.
CUDA is initialised here only, which is why the front end starts this process with "spawn".
"""

from __future__ import annotations

import contextlib
import logging
import queue
import signal
import sys
import threading
from multiprocessing.connection import Connection
from typing import NamedTuple

from martlet.engine.llm_engine import LLMEngine
from martlet.outputs import RequestOutput, TokenLogprobs
from martlet.sampling_params import SamplingParams
from martlet.server.metrics import EngineStats

logger = logging.getLogger("martlet.server")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
WORKER_CHECK_INTERVAL = 1.0  # seconds between looks at the tensor-parallel workers while idle


# ---- front end -> core ------------------------------------------------------------------------


class AddRequest(NamedTuple):
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


class AbortRequest(NamedTuple):
    request_id: str
    index: int | None = None  # only this choice of it


class Shutdown(NamedTuple):
    pass


Command = AddRequest | AbortRequest | Shutdown


# ---- core -> front end ------------------------------------------------------------------------


class CoreReady(NamedTuple):
    """The engine is built; what the front end needs to check requests as the engine would."""

    max_model_len: int
    vocab_size: int


class CoreFailed(NamedTuple):
    error: str


# What one choice of a request gained in one step: (request id, choice index, new token ids, their
# logprobs or None, finish reason, stop reason, prompt logprobs (with the first token only, if asked)).
# A plain tuple, not a NamedTuple: there are hundreds per step, and pickle takes plain tuples several
# times faster.
RequestDelta = tuple[str, int, list[int], list[TokenLogprobs] | None, str | None, int | str | None,
                     list[TokenLogprobs | None] | None]


class StepOutputs(NamedTuple):
    deltas: list[RequestDelta]
    refused: list[tuple[str, str]]  # (request id, why) for requests the engine would not take
    stats: EngineStats


# ---- the process --------------------------------------------------------------------------------


def run_engine_core(model: str, engine_kwargs: dict, commands: Connection, outputs: Connection,
                    log_level: int) -> None:
    """The core process's main: build the engine, say so, then serve until told to stop."""
    # Ctrl-C reaches the whole process group: the server decides when the core stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format=LOG_FORMAT)
    try:
        engine = LLMEngine.from_args(model, **engine_kwargs)
    except Exception as exc:  # a missing model, too little memory: the server says why and exits
        logger.debug("the engine could not be built", exc_info=True)
        outputs.send(CoreFailed(_describe(exc)))
        sys.exit(1)
    engine.prepare_structured_outputs()
    core = EngineCore(engine, commands, outputs)
    outputs.send(CoreReady(engine.config.max_model_len, engine.model_config.vocab_size))
    try:
        core.run()
    except Exception as exc:  # a failed step leaves the engine in an unknown state: stop serving
        logger.exception("the engine core failed")
        with contextlib.suppress(OSError):  # the server may be gone already
            outputs.send(CoreFailed(_describe(exc)))
        sys.exit(1)
    engine.shutdown()


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"


class EngineCore:
    def __init__(self, engine: LLMEngine, commands: Connection, outputs: Connection) -> None:
        self.engine = engine
        self.outputs = outputs
        self.inbox: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self.live: set[str] = set()  # requests the front end still listens to
        self.refused: list[tuple[str, str]] = []
        self.num_steps = 0
        self.num_added = 0
        self.stopping = False
        threading.Thread(target=self._read_commands, args=(commands,), name="martlet-core-commands",
                         daemon=True).start()

    def run(self) -> None:
        """Take commands, step, report; once per step, or once per wake-up when idle."""
        while True:
            self._take_commands(wait=not self.engine.has_unfinished_requests())
            if self.stopping:
                return
            deltas = self._step() if self.engine.has_unfinished_requests() else []
            self.outputs.send(StepOutputs(deltas, self.refused, self._stats()))
            self.refused = []

    def _read_commands(self, commands: Connection) -> None:
        try:
            while True:
                self.inbox.put(commands.recv())
        except (EOFError, OSError):  # the server is gone: nobody is left to serve
            self.inbox.put(Shutdown())

    def _take_commands(self, wait: bool) -> None:
        if wait:
            self._do(self._next_command())
        while not self.inbox.empty():
            self._do(self.inbox.get_nowait())

    def _next_command(self) -> Command:
        """Wait for a command; with tensor-parallel workers, look at them every second meanwhile, so
        that one dying fails an idle engine too (WorkerDiedError), not only the next request."""
        workers = self.engine.workers
        while True:
            try:
                return self.inbox.get(timeout=None if workers is None else WORKER_CHECK_INTERVAL)
            except queue.Empty:
                workers.check()

    def _do(self, command: Command) -> None:
        match command:
            case AddRequest(request_id, prompt_token_ids, params):
                self._add(request_id, prompt_token_ids, params)
            case AbortRequest(request_id, index):
                self.engine.abort_request(request_id, index)
                if request_id not in self.engine.requests:
                    self.live.discard(request_id)
            case Shutdown():
                self.stopping = True

    def _add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.num_added += 1
        try:
            self.engine.add_request(prompt_token_ids, params, request_id=request_id)
        except ValueError as exc:  # the front end checked it already: this is a last line
            self.refused.append((request_id, str(exc)))
            return
        self.live.add(request_id)

    def _step(self) -> list[RequestDelta]:
        outputs = self.engine.step("delta")  # each output holds this step's token only
        self.num_steps += 1
        # A request aborted while its step ran may still report: nobody is listening for it.
        return [delta for output in outputs if output.request_id in self.live for delta in self._deltas(output)]

    def _deltas(self, output: RequestOutput) -> list[RequestDelta]:
        if output.finished:
            self.live.discard(output.request_id)
        return [(output.request_id, c.index, c.token_ids, c.logprobs, c.finish_reason, c.stop_reason,
                 output.prompt_logprobs if c.index == 0 else None) for c in output.outputs]

    def _stats(self) -> EngineStats:
        scheduler = self.engine.scheduler
        return EngineStats(
            num_running=len(scheduler.running), num_waiting=len(scheduler.waiting),
            kv_cache_usage=self.engine.block_manager.usage, num_steps=self.num_steps, num_added=self.num_added,
            num_spec_steps=self.engine.num_spec_steps, num_draft_tokens=self.engine.num_draft_tokens,
            num_accepted_tokens=self.engine.num_accepted_tokens,
        )
