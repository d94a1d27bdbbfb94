"""Turns a scheduled batch into flat tensors, runs the model, and samples.

The flat batch has no padding: the new tokens of all sequences back to back, prefills first.
Only the last token of a sequence whose prompt is complete gets logits; a prompt chunk that
leaves more of the prompt for later is computed into the cache and produces nothing. A decode
that verifies k proposals (speculative decoding) runs k + 1 tokens, like a prompt chunk, and all
k + 1 get logits.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from martlet import distributed
from martlet.config import EngineConfig, ModelConfig
from martlet.device import to_device
from martlet.engine.cuda_graphs import MIXED_GRAPH_MAX_TOKENS, DecodeGraphs, MixedStepGraphs, VerifyGraphs
from martlet.engine.flat_batch import block_table_array, flat_batch
from martlet.engine.scheduler import ScheduledBatch
from martlet.engine.sequence import PLACEHOLDER, Sequence
from martlet.engine.speculative import MAX_SPECULATIVE_BATCH, Proposer, tree_rows
from martlet.layers.attention import AttentionMetadata
from martlet.layers.kv_cache import allocate_kv_cache, kv_format, tile_bytes
from martlet.layers.sampler import Sampler, SamplerOutput, logprob_rows, record_prompt_logprobs
from martlet.models.llama import LlamaForCausalLM
from martlet.sampling_params import SamplingParams

CPU_KV_CACHE_BYTES = 4 << 30  # the default pool on a CPU when num_kv_blocks is not given


class ModelRunner:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, model: LlamaForCausalLM,
                 proposer: Proposer | None = None) -> None:
        """A speculative `proposer` may have a model of its own (a draft model, EAGLE's layer): its K/V
        get a pool of their own with as many blocks as the model's, so the model's block tables index
        both. It may keep a hidden state of the model per cache slot (`feature_size`), and guess from
        the hidden states a step samples from (Medusa)."""
        self.config = config
        self.model_config = model_config
        self.model = model
        self.proposer = proposer
        self.device = config.device
        self.block_size = config.block_size
        self.kv_format = kv_format(config.kv_cache_dtype)
        self.tp_size = distributed.tp_size()
        if self.tp_size > 1:  # every rank has its weights before the first step with a timeout
            distributed.wait_for_all_ranks()
        self.sampler = Sampler(config.device, config.seed)
        # None while profiling; made once the KV pool exists.
        self.decode_graphs: DecodeGraphs | None = None
        self.mixed_graphs: MixedStepGraphs | None = None
        self.verify_graphs: VerifyGraphs | None = None
        self.last_token_ids = torch.zeros(0, dtype=torch.int64, device=self.device)
        self.num_kv_blocks = self._choose_num_blocks()
        if self.tp_size > 1:  # one block table serves every rank's pool: the smallest decides
            self.num_kv_blocks = distributed.min_over_ranks(self.num_kv_blocks)
        self._allocate_kv_cache(self.num_kv_blocks)
        # Graphs need kernels that take everything from device tensors: the Triton backend's.
        use_graphs = (
            self.device.type == "cuda" and config.attention_backend == "triton" and not config.enforce_eager
        )
        if use_graphs:
            pool = torch.cuda.graph_pool_handle()  # one pool: steps replay one at a time
            self.decode_graphs = DecodeGraphs(model, config.max_num_seqs, config.max_model_len, config.block_size,
                                              self.device, pool)
            max_mixed_tokens = min(config.max_num_batched_tokens, MIXED_GRAPH_MAX_TOKENS)
            self.mixed_graphs = MixedStepGraphs(model, max_mixed_tokens, self.device)
            self.mixed_graphs.capture(pool)
            # Workers have no proposer, so their steps take the mixed-step graphs or none: the driver
            # does the same with tensor parallelism, to run the same collectives.
            if proposer is not None and self.tp_size == 1:
                max_query_len = config.speculative_config.num_speculative_tokens + 1
                self.verify_graphs = VerifyGraphs(model, min(config.max_num_seqs, MAX_SPECULATIVE_BATCH), max_query_len,
                                                  config.max_model_len, config.block_size, self.device)
                self.verify_graphs.capture(pool)
                proposer.capture_graphs()

    # ---- the KV pool -------------------------------------------------------------------------

    @property
    def models(self) -> list[LlamaForCausalLM]:
        """The models that keep K/V in the pool's blocks: the model, then the proposer's if any."""
        draft = self.proposer and self.proposer.model
        return [self.model] if draft is None else [self.model, draft]

    def kv_bytes_per_block(self, model: LlamaForCausalLM | None = None) -> int:
        """K and V of every layer of `model` (default: the model) for one block of tokens, in the
        cache's format (scales included)."""
        model = model or self.model
        m = model.config
        return 2 * m.num_layers * _kv_heads(model) * tile_bytes(self.block_size, m.head_dim, self.config.dtype,
                                                               self.kv_format)

    def _pool_bytes_per_block(self) -> int:
        features = self.block_size * self._feature_size() * self.config.dtype.itemsize
        return sum(self.kv_bytes_per_block(model) for model in self.models) + features

    def _feature_size(self) -> int:
        return 0 if self.proposer is None else self.proposer.feature_size

    def _choose_num_blocks(self) -> int:
        if self.device.type == "cuda":
            # Run even when the pool size is given: the step also builds the prefill kernels, which the
            # first request would otherwise wait for.
            peak = self._run_largest_step()
            if self.config.num_kv_blocks is not None:
                return self.config.num_kv_blocks
            return self._blocks_that_fit(peak)
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        wanted = self.config.max_num_seqs * -(-self.config.max_model_len // self.block_size)
        return max(1, min(wanted, CPU_KV_CACHE_BYTES // self._pool_bytes_per_block()))

    def _run_largest_step(self) -> int:
        """Run the largest step the engine will run (one prefill of max_num_batched_tokens tokens) on a
        one-block pool; return the GPU memory peak in bytes: weights plus that step's activations."""
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self._allocate_kv_cache(1)
        n = min(self.config.max_num_batched_tokens, self.config.max_model_len)
        probe = Sequence("profile", [0] * n, SamplingParams(), eos_token_ids=[])
        probe.block_table = [0] * -(-n // self.block_size)
        # Every rank runs it in its own start-up: no message to the workers.
        self._launch(self._plan(ScheduledBatch([probe], [n], num_prefills=1), sample=False), None)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()

    def _blocks_that_fit(self, peak: int) -> int:
        """Blocks that fit in gpu_memory_utilization of the card after `peak` bytes."""
        total = torch.cuda.get_device_properties(self.device).total_memory
        free_for_kv = total * self.config.gpu_memory_utilization - peak
        num_blocks = int(free_for_kv // self._pool_bytes_per_block())
        if num_blocks < 1:
            raise RuntimeError(
                f"no GPU memory left for the KV cache: weights and activations peak at "
                f"{peak / 2**30:.1f} GiB of {total / 2**30:.1f} GiB; raise gpu_memory_utilization "
                "or lower max_num_batched_tokens"
            )
        return num_blocks

    def _allocate_kv_cache(self, num_blocks: int) -> None:
        self.kv_cache = self.kv_caches = None  # free the old pools before making the new ones
        self.kv_caches = [self._allocate_pool(model, num_blocks) for model in self.models]
        self.kv_cache = self.kv_caches[0]  # the model's
        if self._feature_size():
            self.proposer.features = None
            self.proposer.features = torch.zeros(num_blocks * self.block_size, self._feature_size(),
                                                 dtype=self.config.dtype, device=self.device)

    def _allocate_pool(self, model: LlamaForCausalLM, num_blocks: int) -> torch.Tensor:
        m, layers = model.config, model.attention_layers()
        pool, views = allocate_kv_cache(len(layers), num_blocks, _kv_heads(model), self.block_size, m.head_dim,
                                        self.config.dtype, self.kv_format, self.device)
        for layer, kv in zip(layers, views):
            layer.kv = kv
        return pool

    # ---- one step ----------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, sample: bool = True) -> LaunchedStep | None:
        """Launch one step and return without waiting for the device. The sampled tokens, for the
        sequences that complete their prompt or decode (`num_sampled`), follow in the result.

        With tensor parallelism the workers get the step first (one message, see `serve_steps`) and
        run the same collectives alongside; the sampled tokens go to them as well, for the next
        step's inputs."""
        step = self._plan(batch, sample)
        if self.tp_size > 1:
            distributed.send_message(step)
        hidden, logits = self._launch(step, batch.seqs)
        if logits is None:
            return None
        seqs = [s for s, n in zip(batch.seqs, batch.num_new_tokens) if num_sampled(s, n)]
        # Tuples: a sequence without proposals gets the empty tuple, no new object (`LaunchedStep.drafts`).
        drafts = [tuple(seq.spec_token_ids) for seq in seqs]
        # One row per sampled position: a sequence's rows are consecutive, its drafts' first.
        row_seqs = [seq for seq, d in zip(seqs, drafts) for _ in range(len(d) + 1)]
        row_drafts = None
        if any(drafts):
            row_drafts = to_device([t for d in drafts for t in [*d, -1]], self.device, torch.int64)
        sampled = self.sampler(logits, row_seqs, row_drafts)
        if self.tp_size > 1:
            distributed.broadcast(sampled.token_ids)
        for seq, end in zip(seqs, itertools.accumulate(len(d) + 1 for d in drafts)):
            seq.sample_row = end - 1
        self.last_token_ids = sampled.token_ids
        guesses = None if self.proposer is None else self.proposer.guess_from_hidden(hidden, len(seqs))
        return LaunchedStep.start(seqs, sampled, drafts, guesses)

    @torch.inference_mode()
    def serve_steps(self) -> None:
        """A worker's loop: run the driver's steps until it sends None."""
        while (step := distributed.receive_message()) is not None:
            if self._launch(step, None)[1] is not None:
                tokens = torch.empty(len(step.logits_indices), dtype=torch.int64, device=self.device)
                self.last_token_ids = distributed.broadcast(tokens)

    def _launch(self, step: StepInput, seqs: list[Sequence] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the model on a step: the hidden states and logits of its sampled positions (logits None
        if it samples nothing). The driver passes the step's sequences (prompt logprobs go into them);
        a worker passes None and takes part in the same collectives."""
        input_ids, positions, meta = self._tensors(step)
        if self.decode_graphs is not None and step.sample and not step.prompt_logprobs \
                and self.decode_graphs.can_run(meta):
            hidden, logits = self.decode_graphs.run(input_ids, positions, meta)
            self._keep_features(hidden, meta)
            return hidden, logits
        if self.verify_graphs is not None and self.verify_graphs.can_run(meta, meta.tree_mask is not None):
            hidden = self.verify_graphs.run(input_ids, positions, meta)
        elif self.mixed_graphs is not None and self.mixed_graphs.can_run(len(input_ids)):
            hidden = self.mixed_graphs.run(input_ids, positions, meta)
        else:
            hidden = self.model(input_ids, positions, meta)
        self._keep_features(hidden, meta)
        if step.prompt_logprobs:
            self._prompt_logprobs(hidden, seqs, step.num_new_tokens)
        if not step.sample or not step.logits_indices:
            return hidden, None
        hidden = hidden[to_device(step.logits_indices, self.device, torch.int64)]
        return hidden, self.model.compute_logits(hidden)

    def _prompt_logprobs(self, hidden: torch.Tensor, seqs: list[Sequence] | None, counts: list[int]) -> None:
        """Score prompt tokens, a slice of rows at a time; with tensor parallelism the driver names
        each slice to the workers, whose LM head shares take part in it."""
        def logits_of(start: int, stop: int) -> torch.Tensor:
            if self.tp_size > 1:
                distributed.send_message((start, stop))
            return self.model.compute_logits(hidden[start:stop])

        if seqs is not None:
            record_prompt_logprobs(seqs, counts, logits_of)
            if self.tp_size > 1:
                distributed.send_message(None)
            return
        while (rows := distributed.receive_message()) is not None:
            self.model.compute_logits(hidden[rows[0] : rows[1]])

    def _keep_features(self, hidden: torch.Tensor, meta: AttentionMetadata) -> None:
        """The proposer's copy of every new token's hidden state, at its cache slot (EAGLE's input)."""
        if self.proposer is not None and self.proposer.features is not None:
            self.proposer.features[meta.slot_mapping] = hidden

    def _plan(self, batch: ScheduledBatch, sample: bool = True) -> StepInput:
        """The step as plain host data: the batch's inputs, where its sequences stand, and which
        positions are sampled."""
        seqs, counts = batch.seqs, batch.num_new_tokens
        starts = [seq.num_computed_tokens for seq in seqs]
        input_ids: list[int] = []
        # A decode's input may be the token the previous step is still sampling: it is taken from
        # that step's output on the device, without a round trip through the host.
        pending_at: list[int] = []
        pending_rows: list[int] = []
        bs = self.block_size
        for seq, start, n in zip(seqs, starts, counts):
            if len(seq.block_table) * bs < start + n:
                raise RuntimeError(f"request {seq.request_id} has no cache block for position {start + n - 1}")
            own = n - len(seq.spec_token_ids)  # the sequence's own tokens; its drafts, if any, follow
            if seq.token_ids[start + own - 1] == PLACEHOLDER:
                pending_at.append(len(input_ids) + own - 1)
                pending_rows.append(seq.sample_row)
            input_ids += seq.token_ids[start : start + own] + seq.spec_token_ids
        ends = itertools.accumulate(counts)
        logits_indices = [i for seq, n, end in zip(seqs, counts, ends) for i in range(end - num_sampled(seq, n), end)]
        # Prompt logprobs score every prompt position, so they need all hidden states, not one per sequence.
        prompt_logprobs = sample and any(s.wants_prompt_logprobs for s in seqs)
        return StepInput(input_ids, starts, counts, block_table_array([seq.block_table for seq in seqs]),
                         batch.num_prefills, *self._trees(seqs, counts), pending_at, pending_rows, logits_indices,
                         sample, prompt_logprobs)

    def _tensors(self, step: StepInput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """The step's input ids, positions and attention metadata on the device."""
        positions, meta = flat_batch(step.starts, step.num_new_tokens, step.block_tables, step.num_prefills,
                                     self.block_size, self.device, step.position_offsets, step.tree_mask)
        input_ids = to_device(step.input_ids, self.device, torch.int64)
        if step.pending_at:
            rows = to_device(step.pending_rows, self.device, torch.int64)
            input_ids[to_device(step.pending_at, self.device, torch.int64)] = self.last_token_ids[rows]
        return input_ids, positions, meta

    @staticmethod
    def _trees(seqs: list[Sequence], counts: list[int]) -> tuple[list[int] | None, list[int] | None]:
        """Per token of a batch where some sequence verifies a tree of proposals: how far its position
        is behind its place in the chunk, and its tree mask (`flat_batch`); (None, None) in any other."""
        if not any(seq.spec_parents[: len(seq.spec_token_ids)] for seq in seqs):
            return None, None
        offsets, bits = [], []
        for seq, n in zip(seqs, counts):
            parents = seq.spec_parents[: len(seq.spec_token_ids)]
            rows = tree_rows(parents, n - len(parents)) if parents else ([0] * n, [-1] * n)
            offsets += rows[0]
            bits += rows[1]
        return offsets, bits


@dataclass
class StepInput:
    """One step as plain host data: what the driver sends each tensor-parallel worker (pickled: lists
    and ints, and the block tables as one numpy array; no tensors)."""

    input_ids: list[int]
    starts: list[int]  # per sequence, the position of its first new token
    num_new_tokens: list[int]
    block_tables: np.ndarray  # int32 [sequences, blocks] (`block_table_array`): one buffer to pickle
    num_prefills: int
    position_offsets: list[int] | None  # a tree of proposals (`flat_batch`)
    tree_mask: list[int] | None
    pending_at: list[int]  # inputs that are the previous step's sampled tokens ...
    pending_rows: list[int]  # ... and their rows in its output
    logits_indices: list[int]  # the positions that are sampled
    sample: bool
    prompt_logprobs: bool


@dataclass
class LaunchedStep:
    """A launched step whose sampled tokens are on their way to the host."""

    seqs: list[Sequence]  # the sequences that get tokens, in sampler row order
    # Per sequence, the proposals it verifies: its rows are 1 + len(drafts). A step lives into the next,
    # so a fresh empty list per sequence here outlived the garbage collector's youngest generation and
    # soon set off full collections of the whole heap: 6% of b256 decode on an H200.
    drafts: list[tuple[int, ...]]
    host: SamplerOutput  # host copies, filled by non-blocking copies from the device
    ready: torch.cuda.Event | None
    # Per sampler row, the proposer's guesses of the tokens after the row's token (Medusa), host copy.
    guesses: torch.Tensor | None = None

    @classmethod
    def start(cls, seqs: list[Sequence], sampled: SamplerOutput, drafts: list[tuple[int, ...]] | None = None,
              guesses: torch.Tensor | None = None) -> LaunchedStep:
        drafts = drafts or [()] * len(seqs)
        if sampled.token_ids.device.type != "cuda":
            return cls(seqs, drafts, sampled, None, guesses)
        # Queued right behind the sampler, ahead of whatever step is launched next.
        host = SamplerOutput(*(t.to("cpu", non_blocking=True) if t is not None else None
                               for t in (sampled.token_ids, sampled.top_ids, sampled.top_logprobs,
                                         sampled.sampled_logprobs)))
        if guesses is not None:
            guesses = guesses.to("cpu", non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return cls(seqs, drafts, host, ready, guesses)

    @property
    def verifies(self) -> bool:
        return any(self.drafts)

    def results(self) -> tuple[list[int], list[dict[int, float]] | None]:
        """Per sampler row, tokens, and logprob rows if any sequence asked; waits for this step only."""
        if self.ready is not None:
            self.ready.synchronize()
        tokens = self.host.token_ids.tolist()
        if self.host.top_ids is None:
            return tokens, None
        counts = [s.params.logprobs or 0 for s, d in zip(self.seqs, self.drafts) for _ in range(len(d) + 1)]
        rows = logprob_rows(self.host.top_ids.tolist(), self.host.top_logprobs.tolist(), tokens,
                            self.host.sampled_logprobs.tolist(), counts)
        return tokens, rows

    def guess_rows(self) -> list[list[int]] | None:
        """Per sampler row, the proposer's guesses, if it made any (after `results`, which waits)."""
        return None if self.guesses is None else self.guesses.tolist()


def _kv_heads(model: LlamaForCausalLM) -> int:
    """KV heads in this rank's share of `model` (all of them without tensor parallelism): its pool
    holds only those."""
    return model.attention_layers()[0].num_kv_heads


def num_sampled(seq: Sequence, num_new_tokens: int) -> int:
    """Tokens this step samples for the sequence: none for a prompt chunk that leaves more of the
    prompt for later, one when the step computes its last known token, and one more per proposal
    it verifies."""
    if seq.num_computed_tokens + num_new_tokens != len(seq) + len(seq.spec_token_ids):
        return 0
    return 1 + len(seq.spec_token_ids)
