"""An LLMEngine stepping on its own thread, with an asyncio face for the HTTP server.

Two sides, one hand-off each way:
- The step thread owns the engine. Between steps it drains an inbox of commands (add a request,
  abort one, stop); when there is nothing to run it sleeps on that inbox. It never touches a
  tokenizer or a socket, so the accelerator never waits on HTTP or text.
- The event loop owns everything else. Each step's outputs cross over in one
  `call_soon_threadsafe` and land in per-request asyncio queues, so a token reaches its stream
  the step it is made; there the `OutputProcessor` turns tokens into text.

A request that leaves early (its client went away, a stop string hit) aborts its engine request
through the inbox, so its KV blocks are free by the end of the current step.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from functools import partial

from martlet.engine.llm_engine import LLMEngine
from martlet.outputs import RequestOutput
from martlet.sampling_params import SamplingParams
from martlet.server.metrics import EngineStats, ServerMetrics
from martlet.server.output_processor import Delta, OutputProcessor

logger = logging.getLogger("martlet.server")


class EngineError(RuntimeError):
    """The engine could not serve a request it had accepted."""


class EngineDeadError(EngineError):
    """The step thread stopped (a failed step, or shutdown): no request can be served."""


@dataclass
class _Tracked:
    """One engine request of a `generate` call, as the front end follows it."""

    index: int
    num_prompt_tokens: int
    processor: OutputProcessor
    arrival: float
    first_token: float | None = None
    engine_finished: bool = False


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        # Read-only after start, so the event loop may use them freely; the tokenizer is used
        # only there, since the engine runs with detokenize=False.
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.config.max_model_len
        self.stats = EngineStats(kv_cache_usage=engine.block_manager.usage)
        self.metrics = ServerMetrics(lambda: self.stats)
        self.error: EngineDeadError | None = None
        self._inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue[RequestOutput | EngineError]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._running = False
        self._num_steps = 0
        self._num_submitted = 0  # requests put in the inbox (event loop side)
        self._num_added = 0  # requests taken out of it (step thread side)

    # ---- lifecycle (event loop side) ------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._running = True
        self._thread = threading.Thread(target=self._run, name="martlet-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        """Stop the step thread after its current step; requests still open fail."""
        if self._thread is None:
            return
        self._inbox.put(self._stop)
        self._thread.join()
        self._thread = None
        self._fail_all(EngineDeadError("the server is shutting down"))

    @property
    def num_waiting(self) -> int:
        """Requests queued for the batch: the engine's queue, plus those still in the inbox."""
        return self.stats.num_waiting + self._num_submitted - self.stats.num_added

    # ---- requests (event loop side) -------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        return self.engine.tokenize(text)

    def validate_request(self, token_ids: list[int], params: SamplingParams) -> None:
        """Raises ValueError for a request the engine would refuse (reads only its config)."""
        self.engine.validate_request(token_ids, params)

    async def generate(
        self, request_id: str, prompts: list[list[int]], params: list[SamplingParams],
    ) -> AsyncIterator[tuple[int, Delta]]:
        """Run every prompt as its own engine request; yield (prompt index, delta) as tokens come.

        Closing or cancelling the iterator aborts whatever is still running.
        """
        if self.error is not None:
            raise EngineDeadError(str(self.error))
        outputs: asyncio.Queue[RequestOutput | EngineError] = asyncio.Queue()
        tracked: dict[str, _Tracked] = {}
        now = time.perf_counter()
        for i, (token_ids, p) in enumerate(zip(prompts, params)):
            engine_id = f"{request_id}-{i}"
            tracked[engine_id] = _Tracked(i, len(token_ids), OutputProcessor(self.tokenizer, token_ids, p), now)
            self._streams[engine_id] = outputs
            self._num_submitted += 1
            # The engine gets token work only: text and stop strings are the processor's.
            self._inbox.put(partial(self._add, engine_id, token_ids, replace(p, detokenize=False, stop=None)))
        try:
            while not all(t.processor.finished for t in tracked.values()):
                for output in await _latest_outputs(outputs):
                    t = tracked[output.request_id]
                    if t.processor.finished:
                        continue  # tokens made after a stop string, before the abort landed
                    t.engine_finished = output.finished
                    delta = t.processor.process(output)
                    if t.first_token is None:
                        t.first_token = time.perf_counter()
                    yield t.index, delta
        finally:
            self._close(tracked)

    def _close(self, tracked: dict[str, _Tracked]) -> None:
        end = time.perf_counter()
        for engine_id, t in tracked.items():
            self._streams.pop(engine_id, None)
            if not t.engine_finished:
                self._inbox.put(partial(self.engine.abort_request, engine_id))
            self.metrics.observe_request(
                t.processor.finish_reason or "abort", t.num_prompt_tokens, t.processor.num_tokens,
                t.arrival, t.first_token, end,
            )

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is not None:  # None: its client has left and its abort is on the way
                stream.put_nowait(output)

    def _fail(self, engine_id: str, error: EngineError) -> None:
        stream = self._streams.get(engine_id)
        if stream is not None:
            stream.put_nowait(error)

    def _fail_all(self, error: EngineDeadError) -> None:
        self.error = self.error or error
        for engine_id in list(self._streams):
            self._fail(engine_id, error)

    # ---- the step thread ------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._running:
                self._drain_inbox(wait=not self.engine.has_unfinished_requests())
                self._publish_stats()
                if self._running and self.engine.has_unfinished_requests():
                    self._step()
        except Exception as exc:  # a failed step leaves the engine in an unknown state: stop serving
            logger.exception("engine step failed; the server can serve no more requests")
            self._loop.call_soon_threadsafe(self._fail_all, EngineDeadError(f"the engine failed: {exc!r}"))

    def _step(self) -> None:
        outputs = self.engine.step()
        self._num_steps += 1
        self._publish_stats()  # before the hand-off: a client that sees its token sees these counts
        if outputs:  # one hand-off per step, however many requests got a token
            self._loop.call_soon_threadsafe(self._deliver, outputs)

    def _drain_inbox(self, wait: bool) -> None:
        if wait:
            self._inbox.get()()
        while True:
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return
            command()

    def _add(self, engine_id: str, token_ids: list[int], params: SamplingParams) -> None:
        self._num_added += 1
        try:
            self.engine.add_request(token_ids, params, request_id=engine_id)
        except ValueError as exc:  # checked on the front end already; this is a last line
            self._loop.call_soon_threadsafe(self._fail, engine_id, EngineError(f"the engine refused it: {exc}"))

    def _stop(self) -> None:
        self._running = False

    def _publish_stats(self) -> None:
        scheduler = self.engine.scheduler
        self.stats = EngineStats(
            num_running=len(scheduler.running), num_waiting=len(scheduler.waiting),
            kv_cache_usage=self.engine.block_manager.usage, num_steps=self._num_steps, num_added=self._num_added,
        )


async def _latest_outputs(outputs: asyncio.Queue[RequestOutput | EngineError]) -> list[RequestOutput]:
    """Wait for outputs, then take all that are queued, keeping each request's latest only.

    Each output holds all of its request's tokens so far, so a reader that fell behind catches
    up in one go instead of paying for every step it missed.
    """
    items = [await outputs.get()]
    while not outputs.empty():
        items.append(outputs.get_nowait())
    latest: dict[str, RequestOutput] = {}
    for item in items:
        if isinstance(item, EngineError):
            raise item
        latest[item.request_id] = item
    return list(latest.values())
