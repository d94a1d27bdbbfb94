"""The engine core: requests in, one step at a time, outputs out.

`step()` is the whole loop: schedule, launch, collect. Everything about text (tokenizing,
detokenizing, stop strings) sits at the edges, in `add_request` and `_check_finished`, and only
for requests with `detokenize=True`, so a front end that does those elsewhere (the server) can
drive the same core.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from martlet import distributed
from martlet.config import (
    KV_CACHE_DTYPES,
    QUANTIZATIONS,
    EngineArgs,
    EngineConfig,
    ModelConfig,
    SpeculativeConfig,
    default_block_size,
)
from martlet.engine.block_manager import BlockManager
from martlet.engine.detokenizer import IncrementalDetokenizer
from martlet.engine.executor import Workers, launched_rank, run_node, run_worker
from martlet.engine.model_runner import LaunchedStep, ModelRunner
from martlet.engine.scheduler import ScheduledBatch, Scheduler
from martlet.engine.sequence import PLACEHOLDER, Sequence
from martlet.engine.speculative import MAX_SPECULATIVE_BATCH, accepted_path, accepted_prefix, make_proposer
from martlet.layers.sampler import has_penalty
from martlet.models.loader import build_engine_model, is_gguf, load_tokenizer, read_model_config
from martlet.outputs import CompletionOutput, RequestOutput
from martlet.sampling_params import SamplingParams

if TYPE_CHECKING:
    from martlet.structured_output import StructuredOutputs

logger = logging.getLogger("martlet")

OutputKind = Literal["cumulative", "delta", "final"]

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


class LLMEngine:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, tokenizer, quiet: bool = False) -> None:
        self.config = config
        self.model_config = model_config
        self.tokenizer = tokenizer
        # With tensor parallelism the other ranks start first: the model is built as this rank's share.
        self.workers = Workers(config, model_config) if config.tensor_parallel_size > 1 else None
        try:
            model = build_engine_model(config, model_config, quiet)
            spec = config.speculative_config
            backend = model.attention_layers()[0].backend  # a draft model attends the same way
            self.proposer = None if spec is None else make_proposer(config, model_config, model, backend, quiet)
            self.runner = ModelRunner(config, model_config, model, self.proposer)
        except BaseException as exc:
            try:
                if self.workers is not None and isinstance(exc, RuntimeError):
                    self.workers.fail(exc)  # a rank that died while starting is named
                raise
            finally:
                self.shutdown()
        num_blocks = self.runner.num_kv_blocks
        capacity = num_blocks * config.block_size
        if capacity < config.max_model_len:
            raise ValueError(
                f"the KV cache holds {capacity} tokens ({num_blocks} blocks of {config.block_size}), "
                f"fewer than max_model_len={config.max_model_len}: raise num_kv_blocks or "
                "gpu_memory_utilization, or lower max_model_len"
            )
        if not quiet:
            logger.info("KV cache (%s): %d blocks of %d tokens = %d tokens, %.2f GiB", config.kv_cache_dtype,
                        num_blocks, config.block_size, capacity, self.runner.kv_cache.nbytes / 2**30)
        self.block_manager = BlockManager(num_blocks, config.block_size)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.max_model_len)
        self.eos_token_ids = _eos_token_ids(config.model, model_config, tokenizer)
        # Over all requests (each request's own are in its metrics): verification steps, proposed tokens
        # and accepted ones.
        self.num_spec_steps = self.num_draft_tokens = self.num_accepted_tokens = 0
        # Called with every scheduled batch before it runs (benchmarks count its cost).
        self.on_step: Callable[[ScheduledBatch], None] | None = None
        self.requests: dict[str, list[Sequence]] = {}  # request id -> its sequences, one per choice
        self.in_flight: LaunchedStep | None = None  # launched, tokens not collected yet
        self.in_flight_slots: list[int] = []  # where each of its tokens goes in its sequence
        self.detokenizers: dict[Sequence, IncrementalDetokenizer] = {}
        # Grammars, made at the first request that has one; requests wait here while theirs compiles.
        self.structured: StructuredOutputs | None = None
        self.waiting_for_grammar: list[tuple[Future, list[Sequence]]] = []
        self.runner.sampler.grammar_bitmask = self._grammar_bitmask
        self._output_kind: OutputKind = "cumulative"  # of the step() under way
        self._early_outputs: list[RequestOutput] = []  # collected in the middle of a step (see _grammar_bitmask)
        self._ids = itertools.count()
        if self.workers is not None:
            self.workers.busy = False  # started: waits on the ranks only within a step now

    @classmethod
    def from_args(cls, model: str, **kwargs) -> LLMEngine:
        """An engine for `model`; `kwargs` are `EngineArgs`' (an unknown name is a TypeError)."""
        args = EngineArgs(model=str(model), **kwargs)
        config, model_config = resolve_config(args)
        if config.node_rank != 0:
            raise ValueError(f"node_rank={config.node_rank} runs ranks only, no engine: see martlet.engine.executor")
        torch.manual_seed(args.seed)
        return cls(config, model_config, _try_tokenizer(args.model), quiet=args.quiet)

    # ---- requests ----------------------------------------------------------------------------

    def tokenize(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: pass {'prompt_token_ids': [...]} instead of text")
        return self.tokenizer.encode(prompt)

    def validate_request(self, token_ids: list[int], params: SamplingParams) -> None:
        """Everything about a request that can be wrong, checked before it is queued."""
        validate_request(token_ids, params, max_model_len=self.config.max_model_len,
                         vocab_size=self.model_config.vocab_size)
        if params.stop_strings and self.tokenizer is None:
            raise ValueError("SamplingParams.stop needs a tokenizer, and this model has none: use stop_token_ids")
        if params.structured_outputs is not None and self.tokenizer is None:
            raise ValueError("SamplingParams.structured_outputs needs a tokenizer, and this model has none")

    def add_request(
        self, prompt_token_ids: list[int], params: SamplingParams, *, prompt: str | None = None,
        request_id: str | None = None,
    ) -> str:
        self.validate_request(prompt_token_ids, params)
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        # One sequence per choice. The first computes the prompt; the others are forked from it once the
        # prompt is in the cache (see _release_forks). Seeded choices get seed, seed + 1, ... (as vLLM).
        seqs = [Sequence(request_id, prompt_token_ids, params, self.eos_token_ids, prompt,
                         self._generator(params, i), index=i) for i in range(params.n)]
        self.requests[request_id] = seqs
        if params.detokenize and self.tokenizer is not None:
            for seq in seqs:
                self.detokenizers[seq] = IncrementalDetokenizer(
                    self.tokenizer, prompt_token_ids, params.stop_strings, params.skip_special_tokens
                )
        if params.structured_outputs is not None:
            self.waiting_for_grammar.append((self._structured().compile(params.structured_outputs), seqs))
        else:
            self._queue(seqs)
        return request_id

    def _queue(self, seqs: list[Sequence]) -> None:
        """Queue the first unfinished sequence; the others wait to be forked from it."""
        live = [seq for seq in seqs if not seq.is_finished]
        if live:
            live[0].forks = live[1:]
            self.scheduler.add(live[0])

    def _generator(self, params: SamplingParams, index: int) -> torch.Generator | None:
        if params.seed is None:
            return None
        return torch.Generator(device=self.config.device).manual_seed(params.seed + index)

    def prepare_structured_outputs(self) -> None:
        """Load the grammar engine now and make its compiler on its worker, as a server does at start: the
        first structured request would otherwise import xgrammar inside the step loop every request
        waits on (served on the CPU, a tiny model's first structured request took 0.38 s, 0.15 s after this)."""
        if self.tokenizer is not None:
            self._structured().warm_up()

    def _structured(self) -> StructuredOutputs:
        if self.structured is None:
            from martlet.structured_output import StructuredOutputs  # xgrammar loads only when it is used

            self.structured = StructuredOutputs(self.tokenizer, self.model_config.vocab_size, self.eos_token_ids,
                                                self.config.max_num_seqs)
        return self.structured

    def abort_request(self, request_id: str, index: int | None = None) -> None:
        """Drop a request wherever it is, or only its choice `index`; the blocks are free when this
        returns."""
        seqs = self.requests.get(request_id, [])
        for seq in seqs:
            if (index is None or seq.index == index) and not seq.is_finished:
                self.scheduler.finish(seq, "abort")
        for seq in seqs:
            if seq.is_finished and seq.forks:  # siblings it held back for its prompt go on without it
                self._queue(seq.forks)
                seq.forks = []
        if all(seq.is_finished for seq in seqs):
            self.waiting_for_grammar = [w for w in self.waiting_for_grammar if w[1] is not seqs]
            self._forget(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0 or self.in_flight is not None or bool(self.waiting_for_grammar)

    # ---- the loop ----------------------------------------------------------------------------

    def step(self, output_kind: OutputKind = "cumulative") -> list[RequestOutput]:
        """Schedule and launch a step, then collect the tokens of the step before it.

        The device runs step N while the host schedules and launches step N+1; only then does
        the host wait for step N's tokens (the one sync), which were sampled into the device-side
        input of N+1 already. A sequence that finishes at step N has one step computed in vain.
        When N+1 has a sequence with a grammar, the wait comes earlier, once N+1's logits are
        launched: its mask needs step N's token (see _grammar_bitmask). With speculative decoding
        it comes before N+1 is scheduled: the proposals are made from step N's tokens, and a step
        that verified proposals must have its rejected ones rolled back first.

        Returns, per `output_kind`: "cumulative", an output with all tokens so far for every
        request that got a token; "delta", the same but with only this step's tokens in `token_ids`
        and `logprobs` (text stays cumulative), which saves copying long outputs every step;
        "final", the whole output of every request that finished.
        """
        self._output_kind = output_kind
        if self.workers is not None:
            self.workers.busy = True
        outputs = self._admit_compiled()
        if self.in_flight is not None and (self.in_flight.verifies or self._speculates()
                                           or any(has_penalty(s) for s in self.scheduler.running)):
            # Penalties count the output tokens on the host; proposals are made from them.
            outputs += self._collect(output_kind)
        if self.proposer is not None:
            self._propose(self._speculates())  # asked again: the sequences just verified may speculate now
        batch = self.scheduler.schedule()
        launched = None
        if batch:
            if self.proposer is not None:
                self.proposer.draft(batch)
            if self.on_step is not None:
                self.on_step(batch)
            launched = self._execute(batch)
            for seq, n in zip(batch.seqs, batch.num_new_tokens):
                seq.num_computed_tokens += n  # rejected proposals are taken back when collected
                seq.spec_token_ids = []
                if seq.forks and seq.num_computed_tokens >= seq.num_prompt_tokens:
                    self._release_forks(seq)
        outputs += self._early_outputs + self._collect(output_kind)
        self._early_outputs = []
        if launched is not None:
            self.in_flight = launched
            self.in_flight_slots = [len(seq) for seq in launched.seqs]
            for seq in launched.seqs:
                if not seq.is_finished:  # one that just finished keeps no trace of the wasted step
                    seq.append_token(PLACEHOLDER)
        if self.workers is not None:
            self.workers.busy = False
        return outputs

    def _execute(self, batch: ScheduledBatch) -> LaunchedStep | None:
        if self.workers is None:
            return self.runner.execute(batch)
        self.workers.check()
        try:
            return self.runner.execute(batch)
        except distributed.CollectiveError as exc:  # a rank died, or hung past the group's timeout
            self.workers.fail(exc)
        except BaseException as exc:
            self.workers.abandon(exc)
            raise

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers, if any (they also end with this process)."""
        if self.workers is not None:
            self.workers.shutdown()

    def _speculates(self) -> bool:
        """Whether this step proposes tokens: a small enough batch with a sequence that may use them
        (otherwise the host stays a step ahead, as without speculation)."""
        running = self.scheduler.running
        return (self.proposer is not None and len(running) <= MAX_SPECULATIVE_BATCH
                and any(self.proposer.may_speculate(seq) for seq in running))

    def _propose(self, speculate: bool) -> None:
        """Each running sequence's proposals for this step: none when the step does not speculate (a
        sequence the scheduler left out last step may still hold old ones)."""
        for seq in self.scheduler.running:
            seq.spec_token_ids = self.proposer.propose(seq) if speculate else []

    def _release_forks(self, parent: Sequence) -> None:
        """The parent's prompt is computed (on the device, by the time anything runs after this step):
        its siblings share its full prompt blocks and queue first, to compute only the rest."""
        for child in reversed([child for child in parent.forks if not child.is_finished]):  # not aborted
            self.block_manager.fork(parent, child)
            self.scheduler.add(child, first=True)
        parent.forks = []

    def _admit_compiled(self) -> list[RequestOutput]:
        """Queue the requests whose grammar is compiled; end those whose grammar failed to compile."""
        if not self.waiting_for_grammar:
            return []
        if not self.scheduler.num_unfinished and self.in_flight is None:  # nothing else to do: sleep, not spin
            wait([future for future, _ in self.waiting_for_grammar], timeout=0.1, return_when=FIRST_COMPLETED)
        waiting, self.waiting_for_grammar, outputs = self.waiting_for_grammar, [], []
        for future, seqs in waiting:
            if not future.done():
                self.waiting_for_grammar.append((future, seqs))
            elif future.exception() is not None:  # checked when the params were made, so not expected
                logger.error("request %s: its grammar did not compile: %s", seqs[0].request_id, future.exception())
                for seq in seqs:
                    self.scheduler.finish(seq, "abort", str(future.exception()))
                outputs.append(self.make_output(seqs))
                self._forget(seqs[0].request_id)
            else:
                for seq in seqs:
                    seq.grammar = self.structured.matcher(future.result())
                self._queue(seqs)
        return outputs

    def _grammar_bitmask(self, seqs: list[Sequence]) -> torch.Tensor | None:
        """The sampler's grammar hook. A matcher must take the previous step's token before it can say
        what may follow, so the step in flight is collected here: the device is busy with this step's
        logits meanwhile, and the host fills the mask while it is (the sampler launches after)."""
        if self.in_flight is not None:
            self._early_outputs += self._collect(self._output_kind)
        return self.structured.bitmask(seqs)

    def _collect(self, output_kind: OutputKind) -> list[RequestOutput]:
        """Wait for the step in flight; put its tokens in place and see who finished."""
        launched, slots = self.in_flight, self.in_flight_slots
        if launched is None:
            return []
        self.in_flight = None
        token_ids, logprobs = launched.results()
        guesses = launched.guess_rows()
        now = time.perf_counter()
        got: dict[str, dict[Sequence, slice]] = {}  # request id -> its sequences that got tokens, and where
        rows = itertools.accumulate((len(d) + 1 for d in launched.drafts), initial=0)
        for seq, slot, drafts, row in zip(launched.seqs, slots, launched.drafts, rows):
            if seq.is_finished:  # finished or aborted while the step ran: its tokens are dropped
                continue
            if drafts:
                new_tokens, last_row = self._accept(seq, drafts, token_ids[row : row + len(drafts) + 1])
                # A verifying step is collected before the next one launches: its placeholder is the
                # last token, and the accepted run takes its place.
                seq.token_ids[slot : slot + 1] = new_tokens
                num_new = len(new_tokens)
            else:
                seq.token_ids[slot] = token_ids[row]
                last_row, num_new = 0, 1
            if guesses is not None or seq.guessed_token_ids:
                seq.guessed_token_ids = () if guesses is None else guesses[row + last_row]
            if logprobs is not None and seq.params.logprobs is not None:  # never with drafts
                seq.output_logprobs.append(logprobs[row])
                seq.cumulative_logprob += logprobs[row][token_ids[row]]
            if seq.grammar is not None:  # never with drafts
                seq.grammar.accept_token(token_ids[row])
            if seq.metrics.first_token_time is None:
                seq.metrics.first_token_time = now
            end = slot
            while not seq.is_finished and end < slot + num_new:
                self._check_finished(seq, end)  # a stop drops the tokens after it
                end += 1
            if seq.is_finished or output_kind != "final":  # else nothing is reported yet
                got.setdefault(seq.request_id, {})[seq] = slice(slot, end)
        outputs = []
        for request_id, slots_of in got.items():
            seqs = self.requests[request_id]
            finished = all(seq.is_finished for seq in seqs)
            if finished or output_kind != "final":
                outputs.append(self.make_output(seqs, slots_of if output_kind == "delta" else None))
            if finished:
                self._forget(request_id)
        return outputs

    def _accept(self, seq: Sequence, drafts: tuple[int, ...], sampled: list[int]) -> tuple[list[int], int]:
        """The tokens a verification step makes for `seq`, and the sampler row of the last one."""
        parents = seq.spec_parents[: len(drafts)]
        if parents:
            new_tokens, last_row, num_in_place = accepted_path(drafts, parents, sampled)
        else:
            new_tokens = accepted_prefix(drafts, sampled)
            last_row = num_in_place = len(new_tokens) - 1
        self._roll_back(seq, drafts, new_tokens, num_in_place)
        return new_tokens, last_row

    def _roll_back(self, seq: Sequence, drafts: tuple[int, ...], new_tokens: list[int], num_in_place: int) -> None:
        """Count only the accepted proposals at their own positions as computed (all accepted ones in a
        chain; in a tree, those along its first branch, the others are computed again next step): the
        K/V of the others stay in the sequence's blocks beyond its computed tokens, to be overwritten."""
        num_accepted = len(new_tokens) - 1
        seq.num_computed_tokens -= len(drafts) - num_in_place
        seq.num_draft_computed_tokens = min(seq.num_draft_computed_tokens, seq.num_computed_tokens)
        for counts in (seq.metrics, self):
            counts.num_spec_steps += 1
            counts.num_draft_tokens += len(drafts)
            counts.num_accepted_tokens += num_accepted

    def _forget(self, request_id: str) -> None:
        for seq in self.requests.pop(request_id, []):
            self.detokenizers.pop(seq, None)

    def _check_finished(self, seq: Sequence, slot: int) -> None:
        """Stop conditions for the token now at `slot` (a later one may be in flight already)."""
        params, token = seq.params, seq.token_ids[slot]
        num_output = slot + 1 - seq.num_prompt_tokens
        if token in params.stop_token_ids:
            return self._finish(seq, slot, "stop", token)
        if token in self.eos_token_ids and not params.ignore_eos:
            return self._finish(seq, slot, "stop")
        detok = self.detokenizers.get(seq)
        if detok is not None:
            # As in vLLM, stop strings count only once min_tokens are out.
            stop = detok.add_tokens([token], check_stop=num_output >= params.min_tokens)
            if stop is not None:
                return self._finish(seq, slot, "stop", stop)
        if seq.reached_length_limit(self.config.max_model_len, num_tokens=slot + 1):
            return self._finish(seq, slot, "length")

    def _finish(self, seq: Sequence, slot: int, reason: str, stop_reason: int | str | None = None) -> None:
        del seq.token_ids[slot + 1 :]  # a token launched after the last one is not output
        detok = self.detokenizers.get(seq)
        if detok is not None:
            detok.flush()
        self.scheduler.finish(seq, reason, stop_reason)

    def make_output(self, seqs: list[Sequence], delta_slots: dict[Sequence, slice] | None = None) -> RequestOutput:
        """A request's output so far: every choice; or with `delta_slots` only the choices in it, each
        with only the tokens at its slots (and the prompt logprobs with the first token)."""
        first = seqs[0]
        prompt_logprobs = first.prompt_logprobs if first.params.prompt_logprobs is not None else None
        if delta_slots is not None and delta_slots.get(first, slice(0)).start != first.num_prompt_tokens:
            prompt_logprobs = None
        shown = seqs if delta_slots is None else [seq for seq in seqs if seq in delta_slots]
        return RequestOutput(
            request_id=first.request_id,
            prompt=first.prompt,
            prompt_token_ids=first.token_ids[: first.num_prompt_tokens],
            outputs=[self._completion(seq, None if delta_slots is None else delta_slots[seq]) for seq in shown],
            finished=all(seq.is_finished for seq in seqs),
            metrics=first.metrics,
            prompt_logprobs=prompt_logprobs,
        )

    def _completion(self, seq: Sequence, delta_slots: slice | None) -> CompletionOutput:
        detok = self.detokenizers.get(seq)
        logprobs = seq.output_logprobs if seq.params.logprobs is not None else None
        token_ids = seq.output_token_ids
        if delta_slots is not None:
            token_ids, logprobs = seq.token_ids[delta_slots], logprobs and logprobs[-1:]
        return CompletionOutput(
            index=seq.index,
            # While running, only text no stop string can take back; all of it once finished.
            text="" if detok is None else (detok.text if seq.is_finished else detok.stable_text),
            token_ids=token_ids,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
            logprobs=logprobs,
            cumulative_logprob=seq.cumulative_logprob if logprobs is not None else None,
        )


def validate_request(token_ids: list[int], params: SamplingParams, *, max_model_len: int, vocab_size: int) -> None:
    """`LLMEngine.validate_request` for a front end that holds no engine, only its limits (the
    server's engine runs in a process of its own, and a bad request must not cross over)."""
    if not isinstance(params, SamplingParams):
        raise ValueError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
    if any(t >= vocab_size for t in params.stop_token_ids):
        raise ValueError(f"SamplingParams.stop_token_ids must be in [0, {vocab_size}), got {params.stop_token_ids}")
    if any(t >= vocab_size for t in params.logit_bias or {}):
        raise ValueError(f"SamplingParams.logit_bias token ids must be in [0, {vocab_size}), "
                         f"got {sorted(t for t in params.logit_bias if t >= vocab_size)[:5]}")
    if not token_ids:
        raise ValueError("the prompt is empty: give at least one token")
    if len(token_ids) >= max_model_len:
        raise ValueError(
            f"the prompt is {len(token_ids)} tokens long, but max_model_len is "
            f"{max_model_len} (the prompt must leave room for at least one new token)"
        )
    bad = [t for t in token_ids if not (isinstance(t, int) and 0 <= t < vocab_size)]
    if bad:
        raise ValueError(f"prompt token ids must be integers in [0, {vocab_size}), got {bad[:5]}")


def run_node_if_not_first(node_rank: int, engine_args: Callable[[], EngineArgs]) -> int | None:
    """On node k > 0 of a multi-node engine (`node_rank` k), run only this node's tensor-parallel ranks,
    whatever the command, and return their exit status; under torchrun, rank k > 0 runs its worker
    alone. None on node 0 and rank 0: they run the command, and `engine_args` is not called (making
    them can look for the default model, which the command does itself)."""
    rank = launched_rank()
    if node_rank == 0 and not rank:
        return None
    config, model_config = resolve_config(engine_args())
    if rank:
        run_worker(config, model_config, rank, logging.getLogger().level)
        return 0
    return run_node(config, model_config)


def resolve_config(args: EngineArgs) -> tuple[EngineConfig, ModelConfig]:
    """`args` checked and resolved to concrete values, with the model's config."""
    if args.kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, "
                         f"got {args.kv_cache_dtype!r}")
    if args.quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {args.quantization!r}")
    model_config = read_model_config(args.model)
    auto_device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto_device if args.device == "auto" else args.device)
    _check_positive(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                    block_size=args.block_size, num_kv_blocks=args.num_kv_blocks, max_model_len=args.max_model_len,
                    tensor_parallel_size=args.tensor_parallel_size, nnodes=args.nnodes)
    if not 0.0 < args.gpu_memory_utilization <= 1.0:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {args.gpu_memory_utilization}")
    if args.tensor_parallel_size % args.nnodes or not 0 <= args.node_rank < args.nnodes:
        raise ValueError(f"tensor_parallel_size={args.tensor_parallel_size} must divide by nnodes={args.nnodes}, "
                         f"and node_rank={args.node_rank} must be in [0, nnodes)")
    per_node = args.tensor_parallel_size // args.nnodes
    if device.type == "cuda" and per_node > torch.cuda.device_count():
        raise ValueError(f"tensor_parallel_size={args.tensor_parallel_size} over {args.nnodes} node(s) needs "
                         f"{per_node} GPUs here; this machine has {torch.cuda.device_count()}")
    if args.nnodes > 1 and args.master_port is None:
        raise ValueError("with nnodes > 1 every node needs the same master_addr and master_port")
    speculative = None if args.speculative_config is None else SpeculativeConfig.from_dict(args.speculative_config)
    if speculative is not None and speculative.method != "ngram" and args.tensor_parallel_size > 1:
        raise ValueError(f"speculative method {speculative.method!r} does not run with tensor parallelism yet "
                         "(its model would be sharded without the workers); n-gram speculation does")
    block_size = args.block_size or default_block_size(args.kv_cache_dtype)
    limit = max_model_len = model_config.max_position_embeddings
    if args.max_model_len is None:
        if args.num_kv_blocks is not None:  # a pool chosen by hand bounds the context too
            max_model_len = min(limit, args.num_kv_blocks * block_size)
    elif args.max_model_len > limit:
        raise ValueError(f"max_model_len={args.max_model_len} exceeds the model's limit of {limit} positions")
    else:
        max_model_len = args.max_model_len
    config = EngineConfig(
        **{name: getattr(args, name) for name in _TAKEN_AS_GIVEN},
        dtype=_resolve_dtype(args.dtype, model_config, device),
        device=device,
        max_model_len=max_model_len,
        block_size=block_size,
        attention_backend=args.attention_backend or ("triton" if device.type == "cuda" else "torch"),
        speculative_config=speculative,
    )
    return config, model_config


# EngineArgs that EngineConfig takes unchanged (checked above where they need it).
_TAKEN_AS_GIVEN = ("model", "max_num_seqs", "max_num_batched_tokens", "num_kv_blocks",
                   "gpu_memory_utilization", "seed", "load_format", "enforce_eager", "kv_cache_dtype", "quantization",
                   "tensor_parallel_size", "nnodes", "node_rank", "master_addr", "master_port")


def _resolve_dtype(dtype: str | torch.dtype, cfg: ModelConfig, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cpu":
            return torch.float32  # exact and fast enough on CPUs; bf16 is there when asked for
        return cfg.torch_dtype if cfg.torch_dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def _check_positive(**values: int | None) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def _try_tokenizer(model: str):
    """The tokenizer, or None for a directory without one: such a model takes token ids only."""
    try:
        return load_tokenizer(model)
    except FileNotFoundError as e:
        logger.warning("%s: prompts must be token ids and outputs will have no text", e)
        return None


def _eos_token_ids(model: str, cfg: ModelConfig, tokenizer) -> list[int]:
    """End-of-sequence ids from the config, generation_config.json and the tokenizer."""
    ids = list(cfg.eos_token_ids)
    gen_config = Path(model) / "generation_config.json"
    if not is_gguf(model) and gen_config.is_file():
        eos = json.loads(gen_config.read_text()).get("eos_token_id")
        ids += [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))
