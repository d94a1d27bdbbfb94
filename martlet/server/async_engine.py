"""The front end's side of the engine: the engine core process, with an asyncio face.

`AsyncEngine` starts the engine core (engine_core.py) in a process of its own, waits until it is
ready, and loads the tokenizer here. From then on three parties share the work:

- the event loop checks requests, sends them to the core, and turns each request's tokens into
  text (`OutputProcessor`) for its HTTP response;
- a reader thread takes the core's one message per step off the pipe and hands all of it to the
  event loop in one `call_soon_threadsafe`, into per-request streams, so a token reaches its
  client the step it is made;
- the core process steps, and waits on nothing but the accelerator.

A request that leaves early (its client went away, a stop string hit) sends an abort, which the
core takes before its next step, so its KV blocks are free by the end of the current one. If the
core dies, every open request fails with `EngineDeadError`, and so does every later one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from martlet.engine import llm_engine
from martlet.models.loader import load_tokenizer
from martlet.sampling_params import SamplingParams
from martlet.server.engine_core import (
    AbortRequest,
    AddRequest,
    Command,
    CoreFailed,
    CoreReady,
    RequestDelta,
    Shutdown,
    StepOutputs,
    run_engine_core,
)
from martlet.server.metrics import EngineStats, ServerMetrics
from martlet.server.output_processor import Delta, OutputProcessor

logger = logging.getLogger("martlet.server")

CORE_EXIT_TIMEOUT = 30.0  # seconds a stopping core gets to finish its step and exit before it is killed


class EngineStartupError(RuntimeError):
    """The engine core could not be started (a missing model file, too little memory, ...)."""


class EngineError(RuntimeError):
    """The engine could not serve a request it had accepted."""


class EngineDeadError(EngineError):
    """The engine core has stopped (it failed, or the server is shutting down): no request can be served."""


@dataclass
class _Tracked:
    """One choice of one engine request of a `generate` call, as the front end follows it."""

    index: int  # the choice's number in the response: prompt number * n + choice number
    num_prompt_tokens: int
    processor: OutputProcessor
    arrival: float
    first_token: float | None = None
    engine_finished: bool = False  # the engine is done with it: it finished there, or was told to stop


class _Stream:
    """Where the core's outputs for one `generate` call wait: `put` never blocks, and `take` gets
    all that came since the last take, so a reader that fell behind catches up in one go."""

    def __init__(self) -> None:
        self._items: list[RequestDelta | EngineError] = []
        self._ready = asyncio.Event()

    def put(self, item: RequestDelta | EngineError) -> None:
        self._items.append(item)
        self._ready.set()

    async def take(self) -> list[RequestDelta | EngineError]:
        await self._ready.wait()
        self._ready.clear()
        items, self._items = self._items, []
        return items


class AsyncEngine:
    def __init__(self, model: str, engine_kwargs: dict) -> None:
        """Start the engine core and wait until its model is loaded; raises EngineStartupError."""
        self.stats = EngineStats()
        self.metrics = ServerMetrics(lambda: self.stats)
        self.error: EngineDeadError | None = None
        self._streams: dict[str, _Stream] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader: threading.Thread | None = None
        self._num_submitted = 0  # requests sent to the core; its stats count those it has taken
        self._stopping = False
        self.died = False  # the core failed or died (not stopped by us)
        # Called on the event loop's thread, with the loop, once the core has died.
        self.on_death: Callable[[asyncio.AbstractEventLoop], object] | None = None
        self.core_process, self._commands, self._outputs = _start_core(model, engine_kwargs)
        try:
            ready = self._wait_until_ready()
            self.tokenizer = _load_tokenizer(model)  # used on the event loop only
        except BaseException:
            self.shutdown()
            raise
        self.max_model_len = ready.max_model_len
        self.vocab_size = ready.vocab_size

    def _wait_until_ready(self) -> CoreReady:
        try:
            message = self._outputs.recv()
        except EOFError:  # it died before it could say why (killed, out of memory, a crash in C)
            message = CoreFailed(f"the engine process exited with code {self._exit_code()}")
        if isinstance(message, CoreFailed):
            raise EngineStartupError(message.error)
        return message

    # ---- lifecycle (event loop side) ------------------------------------------------------------

    def start(self) -> None:
        """Start handing the core's outputs to the running event loop."""
        self._loop = asyncio.get_running_loop()
        self._reader = threading.Thread(target=self._read_outputs, name="martlet-core-outputs", daemon=True)
        self._reader.start()

    def shutdown(self) -> None:
        """Stop the core after its current step and wait for it to exit; requests still open fail."""
        if self._stopping:
            return
        self._stopping = True
        with contextlib.suppress(OSError):  # it may be gone already
            self._commands.send(Shutdown())
        self.core_process.join(CORE_EXIT_TIMEOUT)
        if self.core_process.is_alive():
            logger.warning("the engine core did not stop within %.0f s: killing it", CORE_EXIT_TIMEOUT)
            self.core_process.kill()
            self.core_process.join()
        if self._reader is not None:
            self._reader.join()
        self._commands.close()
        self._outputs.close()
        self._fail_all(EngineDeadError("the server is shutting down"))

    @property
    def num_waiting(self) -> int:
        """Requests queued for the batch: the engine's queue, plus those on their way to it."""
        return self.stats.num_waiting + self._num_submitted - self.stats.num_added

    # ---- requests (event loop side) -------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: send the prompt as a list of token ids")
        return self.tokenizer.encode(text)

    def validate_request(self, token_ids: list[int], params: SamplingParams) -> None:
        """Raises ValueError for a request the engine would refuse, by the engine's own rules."""
        llm_engine.validate_request(token_ids, params, max_model_len=self.max_model_len, vocab_size=self.vocab_size)

    async def generate(
        self, request_id: str, prompts: list[list[int]], params: list[SamplingParams],
    ) -> AsyncIterator[tuple[int, Delta]]:
        """Run every prompt as its own engine request (of `n` choices each); yield (choice number,
        delta) as tokens come, numbering choices prompt by prompt as OpenAI does: prompt * n + choice.

        Closing or cancelling the iterator aborts whatever is still running.
        """
        if self.error is not None:
            raise EngineDeadError(str(self.error))
        stream = _Stream()
        tracked: dict[tuple[str, int], _Tracked] = {}
        now = time.perf_counter()
        try:
            for i, (token_ids, p) in enumerate(zip(prompts, params)):
                core_id = f"{request_id}-{i}"
                for choice in range(p.n):
                    tracked[core_id, choice] = _Tracked(i * p.n + choice, len(token_ids),
                                                        OutputProcessor(self.tokenizer, token_ids, p), now)
                self._streams[core_id] = stream
                # The engine gets token work only: text and stop strings are the processor's.
                self._send(AddRequest(core_id, token_ids, replace(p, detokenize=False, stop=None)))
                self._num_submitted += 1
            while not all(t.processor.finished for t in tracked.values()):
                for key, delta in _to_deltas(tracked, await stream.take()).items():
                    yield tracked[key].index, delta
                self._abort_stopped(tracked)
        finally:
            self._close(tracked)

    def _send(self, command: Command) -> None:
        try:
            self._commands.send(command)
        except OSError as exc:  # the core is gone; the reader thread is about to say so
            raise EngineDeadError("the engine process has stopped") from exc

    def _abort_stopped(self, tracked: dict[tuple[str, int], _Tracked]) -> None:
        """A choice that a stop string ended here still runs in the engine: end it there too."""
        for (core_id, choice), t in tracked.items():
            if t.processor.finished and not t.engine_finished:
                t.engine_finished = True
                with contextlib.suppress(EngineDeadError):  # a dead core holds no blocks
                    self._send(AbortRequest(core_id, choice))

    def _close(self, tracked: dict[tuple[str, int], _Tracked]) -> None:
        end = time.perf_counter()
        for core_id in dict.fromkeys(core_id for core_id, _ in tracked):
            self._streams.pop(core_id, None)
            if not all(t.engine_finished for (c, _), t in tracked.items() if c == core_id):
                with contextlib.suppress(EngineDeadError):  # a dead core holds no blocks
                    self._send(AbortRequest(core_id))
        for t in tracked.values():
            self.metrics.observe_request(
                t.processor.finish_reason or "abort", t.num_prompt_tokens, t.processor.num_tokens,
                t.arrival, t.first_token, end,
            )

    def _deliver(self, outputs: StepOutputs) -> None:
        for delta in outputs.deltas:
            stream = self._streams.get(delta[0])
            if stream is not None:  # None: its client has left and its abort is on the way
                stream.put(delta)
        for core_id, reason in outputs.refused:
            self._fail(core_id, EngineError(f"the engine refused it: {reason}"))

    def _fail(self, core_id: str, error: EngineError) -> None:
        stream = self._streams.get(core_id)
        if stream is not None:
            stream.put(error)

    def _fail_all(self, error: EngineDeadError) -> None:
        self.error = self.error or error
        for core_id in list(self._streams):
            self._fail(core_id, error)

    # ---- the reader thread ----------------------------------------------------------------------

    def _read_outputs(self) -> None:
        try:
            while not isinstance(message := self._outputs.recv(), CoreFailed):
                self.stats = message.stats  # before the hand-off: a client that sees its token sees these
                self._loop.call_soon_threadsafe(self._deliver, message)
            error = f"the engine failed: {message.error}"
        except (EOFError, OSError):
            if self._stopping:
                return
            error = f"the engine process died (exit code {self._exit_code()})"
        logger.error("%s; the server can serve no more requests", error)
        self.died = True
        self._loop.call_soon_threadsafe(self._fail_all, EngineDeadError(error))
        if self.on_death is not None:
            self._loop.call_soon_threadsafe(self.on_death, self._loop)

    def _exit_code(self) -> int | None:
        self.core_process.join(5)  # its pipe closes a moment before it is reaped
        return self.core_process.exitcode


def _to_deltas(tracked: dict[tuple[str, int], _Tracked], items: list[RequestDelta | EngineError],
               ) -> dict[tuple[str, int], Delta]:
    """Turn what the core sent since the last look into one delta per choice of an engine request."""
    deltas: dict[tuple[str, int], Delta] = {}
    for item in items:
        if isinstance(item, EngineError):
            raise item
        core_id, choice, token_ids, logprobs, finish_reason, stop_reason, prompt_logprobs = item
        t = tracked[core_id, choice]
        if t.processor.finished:
            continue  # tokens made after a stop string, before the abort landed
        t.engine_finished = finish_reason is not None
        delta = t.processor.process(token_ids, logprobs, finish_reason, stop_reason)
        delta.prompt_logprobs = prompt_logprobs
        if t.first_token is None:
            t.first_token = time.perf_counter()
        if (core_id, choice) in deltas:
            deltas[core_id, choice] += delta
        else:
            deltas[core_id, choice] = delta
    return deltas


def _start_core(model: str, engine_kwargs: dict) -> tuple[BaseProcess, Connection, Connection]:
    """The engine core process, the pipe we send it commands on, and the one it answers on."""
    context = multiprocessing.get_context("spawn")  # a forked child would share our CUDA state, if any
    core_commands, commands = context.Pipe(duplex=False)
    outputs, core_outputs = context.Pipe(duplex=False)
    process = context.Process(
        target=run_engine_core, name="martlet-engine-core",
        args=(model, engine_kwargs, core_commands, core_outputs, logging.getLogger().getEffectiveLevel()),
    )
    process.start()
    # Now only the core holds its ends, so when it dies our reads end instead of waiting forever.
    core_commands.close()
    core_outputs.close()
    return process, commands, outputs


def _load_tokenizer(model: str):
    """The model's tokenizer, or None for a directory without one (it serves token ids only)."""
    try:
        return load_tokenizer(model)
    except FileNotFoundError:
        return None
