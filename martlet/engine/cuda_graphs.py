"""CUDA graphs: whole decode steps, and mixed steps piece by piece.

A decode step of a 7B model is ~500 small kernel launches; launched one by one from Python they
take longer than the GPU needs to run them at small batch. A captured graph replays all of them
with one launch. Graphs have fixed shapes, so they are captured for a ladder of sizes and a step
is padded up to the next rung; padding rows write nowhere (slot -1) and read nothing (context
length 0).

The attention backend may shape its decode launch by the longest context too (the split count
of split-K decode), so a decode graph is keyed by (batch rung, the backend's `decode_launch_key`).
Every graph a step can ask for is captured at start: a capture in the middle of serving would
stall that step, and every request in it, by the capture's time.

A step with prefill tokens launches attention by its sequences (how many prompts, how long),
which no one graph can hold. Everything else in it sees only the token count, so
`MixedStepGraphs` captures the stretches between attentions per token rung and launches the
attention kernels between their replays (vLLM's piecewise graphs).
"""

from __future__ import annotations

import bisect
import functools
import logging
import time
from collections.abc import Callable
from typing import TypeVar

import torch

from martlet.layers.attention import AttentionMetadata
from martlet.models.llama import LlamaForCausalLM

logger = logging.getLogger("martlet")
T = TypeVar("T")


def size_ladder(max_size: int) -> list[int]:
    """1, 2, 4, 8, then steps of 8 up to 256 and steps of a sixteenth of the power of two below
    beyond (16 up to 512, 32 up to 1024, ...), up to and including max_size's rung.

    Padding then wastes under 8 rows where rows are cheap, and under 1/16 of a large step.
    """
    ladder = [1, 2, 4, 8]
    while ladder[-1] < max_size:
        size = ladder[-1]
        ladder.append(size + max(8, (1 << (size.bit_length() - 1)) // 16))
    return ladder[: bisect.bisect_left(ladder, max_size) + 1]


def padded_batch_size(ladder: list[int], batch_size: int) -> int | None:
    """The smallest rung that holds `batch_size`, or None when it is above the ladder."""
    i = bisect.bisect_left(ladder, batch_size)
    return ladder[i] if i < len(ladder) else None


def capture_plan(
    ladder: list[int], max_model_len: int, graph_key: Callable[[int, int], object]
) -> list[tuple[int, int]]:
    """(rung, longest context) for every distinct graph_key(rung, longest context) a step can need,
    largest rung first.

    Launch keys move only where the longest context crosses a power of two, so trying each power
    of two up to max_model_len's finds them all.
    """
    plan: dict[object, tuple[int, int]] = {}
    for rung in reversed(ladder):
        length = 1
        while True:
            plan.setdefault(graph_key(rung, length), (rung, length))
            if length >= max_model_len:
                break
            length *= 2
    return list(plan.values())


def capture(fn: Callable[[], T], pool: tuple[int, int]) -> tuple[torch.cuda.CUDAGraph, T]:
    """A graph of fn's kernels, and what fn returned while captured (its tensors live in the graph's
    memory). fn runs once before, outside the capture: kernels compile and cuBLAS picks its algorithms."""
    fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out


class CaptureCost:
    """Wall time and GPU memory taken since it was made, as the capture logs print them."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.start = time.perf_counter()
        torch.cuda.empty_cache()  # as each capture does: cached blocks released then are not the graphs' gain
        self.free_before = torch.cuda.mem_get_info(device)[0]

    def __str__(self) -> str:
        taken = self.free_before - torch.cuda.mem_get_info(self.device)[0]
        return f"{time.perf_counter() - self.start:.1f} s, {taken / 2**30:.2f} GiB"


class StaticInputs:
    """The buffers a captured step reads, for up to `max_seqs` sequences and `max_tokens` tokens. A step
    copies its inputs in, and the padding up to its rung is made inert: slots -1 write nowhere,
    context length 0 reads nothing. `query_start_loc` starts as one token per sequence (decode)."""

    def __init__(self, max_tokens: int, max_seqs: int, max_model_len: int, block_size: int,
                 device: torch.device) -> None:
        self.input_ids = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((max_tokens,), -1, dtype=torch.int64, device=device)
        self.query_start_loc = torch.arange(max_seqs + 1, dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(max_seqs, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(max_seqs, -(-max_model_len // block_size), dtype=torch.int32, device=device)

    def metadata(self, num_seqs: int, query_len: int, max_seq_len: int) -> AttentionMetadata:
        """Views of the buffers for `num_seqs` sequences of `query_len` tokens: decodes when one token
        each, else prefills (so that every sequence goes through the prefill kernel)."""
        tokens, decode = num_seqs * query_len, query_len == 1
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:tokens], query_start_loc=self.query_start_loc[: num_seqs + 1],
            seq_lens=self.seq_lens[:num_seqs], block_tables=self.block_tables[:num_seqs],
            num_prefills=0 if decode else num_seqs, num_prefill_tokens=0 if decode else tokens,
            num_decodes=num_seqs if decode else 0, max_query_len=query_len, max_seq_len=max_seq_len,
            query_start_loc_cpu=[], seq_lens_cpu=[],
        )

    def fill(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, padded_tokens: int,
             padded_seqs: int) -> None:
        """Copy a step's inputs in (its sequences' token runs laid out as the captured step's)."""
        num_tokens, num_seqs = input_ids.shape[0], meta.seq_lens.shape[0]
        self.input_ids[:num_tokens].copy_(input_ids, non_blocking=True)
        self.positions[:num_tokens].copy_(positions, non_blocking=True)
        self.slot_mapping[:num_tokens].copy_(meta.slot_mapping, non_blocking=True)
        self.slot_mapping[num_tokens:padded_tokens].fill_(-1)
        self.seq_lens[:num_seqs].copy_(meta.seq_lens, non_blocking=True)
        self.seq_lens[num_seqs:padded_seqs].fill_(0)
        self.block_tables[:num_seqs, : meta.block_tables.shape[1]].copy_(meta.block_tables, non_blocking=True)


class DecodeGraphs:
    """Static input buffers, and one graph per (rung, launch key) that reads them."""

    def __init__(self, model: LlamaForCausalLM, max_batch_size: int, max_model_len: int, block_size: int,
                 device: torch.device, pool: tuple[int, int]) -> None:
        self.model = model
        self.backend = model.attention_layers()[0].backend
        self.num_kv_heads = model.attention_layers()[0].num_kv_heads  # this rank's
        self.ladder = size_ladder(max_batch_size)
        self.inputs = StaticInputs(self.ladder[-1], self.ladder[-1], max_model_len, block_size, device)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.pool = pool
        # Largest rung first, so the smaller ones reuse its memory.
        cost = CaptureCost(device)
        for rung, length in capture_plan(self.ladder, max_model_len, self._key):
            self.graphs[self._key(rung, length)] = self._capture(rung, length)
        logger.info("captured %d decode CUDA graphs in %s: batch sizes %s, each for every split count of attention "
                    "up to a context of %d", len(self.graphs), cost, self.ladder, max_model_len)

    def _key(self, rung: int, max_seq_len: int) -> tuple[int, int]:
        return rung, self.backend.decode_launch_key(rung, self.num_kv_heads, max_seq_len)

    def can_run(self, meta: AttentionMetadata) -> bool:
        return meta.num_prefills == 0 and padded_batch_size(self.ladder, meta.num_decodes) is not None

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states [num_decodes, hidden] and logits [num_decodes, vocab] of a decode-only step,
        by graph replay."""
        bs = meta.num_decodes
        rung = padded_batch_size(self.ladder, bs)
        self.inputs.fill(input_ids, positions, meta, rung, rung)
        graph, (hidden, logits) = self.graphs[self._key(rung, meta.max_seq_len)]
        graph.replay()
        return hidden[:bs], logits[:bs]

    def _capture(self, rung: int, max_seq_len: int
                 ) -> tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, torch.Tensor]]:
        args = (self.inputs.input_ids[:rung], self.inputs.positions[:rung], self.inputs.metadata(rung, 1, max_seq_len))

        def step() -> tuple[torch.Tensor, torch.Tensor]:
            hidden = self.model(*args)
            return hidden, self.model.compute_logits(hidden)

        graph, outputs = capture(step, self.pool)
        logger.debug("captured a decode graph for batch %d (longest context %d)", rung, max_seq_len)
        return graph, outputs


class VerifyGraphs:
    """Whole steps of short chunks (speculative verification: k + 1 tokens per sequence), one graph per
    (sequence rung, longest chunk q): every sequence goes through the prefill attention kernel, whose
    grid (heads, query blocks of q, sequences) is then fixed. A step with fewer sequences or tokens
    is padded: sequences with no tokens (their programs return at once), tokens that write nowhere.
    The graph gives the hidden states; the runner takes the logits of the rows it samples.

    `steps` starts out as the plain functions, which run eagerly (and are tested so on a CPU), until
    `capture` replaces them by their graphs' replays. No tree masks."""

    def __init__(self, model: LlamaForCausalLM, max_batch_size: int, max_query_len: int, max_model_len: int,
                 block_size: int, device: torch.device) -> None:
        self.model = model
        self.ladder = size_ladder(max_batch_size)
        self.max_query_len = max_query_len
        self.inputs = StaticInputs(self.ladder[-1] * max_query_len, self.ladder[-1], max_model_len, block_size,
                                   device)
        self.steps: dict[tuple[int, int], Callable[[], torch.Tensor]] = {
            (rung, q): self._step(rung, q) for rung in self.ladder for q in range(2, max_query_len + 1)}

    def _step(self, rung: int, q: int) -> Callable[[], torch.Tensor]:
        tokens = rung * q
        return functools.partial(self.model, self.inputs.input_ids[:tokens], self.inputs.positions[:tokens],
                                 self.inputs.metadata(rung, q, 0))

    def capture(self, pool: tuple[int, int]) -> None:
        """Capture every step, largest first so the smaller ones reuse its memory."""
        cost = CaptureCost(self.inputs.input_ids.device)
        for key in sorted(self.steps, reverse=True):
            graph, hidden = capture(self.steps[key], pool)
            self.steps[key] = functools.partial(_replay, graph, hidden)
        logger.info("captured %d verification CUDA graphs in %s: up to %d sequences of up to %d tokens",
                    len(self.steps), cost, self.ladder[-1], self.max_query_len)

    def can_run(self, meta: AttentionMetadata, tree: bool) -> bool:
        return (not tree and 1 < meta.max_query_len <= self.max_query_len
                and padded_batch_size(self.ladder, len(meta.seq_lens_cpu)) is not None)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states [T, hidden], as `model(input_ids, positions, meta)`."""
        num_tokens, num_seqs = input_ids.shape[0], len(meta.seq_lens_cpu)
        rung = padded_batch_size(self.ladder, num_seqs)
        self.inputs.fill(input_ids, positions, meta, rung * meta.max_query_len, rung)
        self.inputs.query_start_loc[: num_seqs + 1].copy_(meta.query_start_loc)
        self.inputs.query_start_loc[num_seqs + 1 : rung + 1].fill_(num_tokens)  # padding sequences have no tokens
        return self.steps[rung, meta.max_query_len]()[:num_tokens]


def _replay(graph: torch.cuda.CUDAGraph, out: torch.Tensor) -> torch.Tensor:
    graph.replay()
    return out


# Mixed steps of more tokens run eagerly: their matmuls alone then keep the device busier than
# launching the step's kernels one by one keeps the host (a 7B model: ~15 ms either way at 1024).
MIXED_GRAPH_MAX_TOKENS = 1024


class MixedStepGraphs:
    """Per token rung, one graph for each stretch between two attentions, replayed around eager attention.

    Piece 0 runs from the embeddings to layer 0's rotated queries (its keys and values go to the
    cache); piece i from layer i-1's attention output to layer i's queries; the last piece to the
    final norm. Pieces hand the step on in fixed buffers: the residual stream, the queries, the
    attention output. `pieces` starts out as the plain functions, which run eagerly, until
    `capture` replaces them by their graphs' replays.
    """

    def __init__(self, model: LlamaForCausalLM, max_num_tokens: int, device: torch.device) -> None:
        self.model = model
        self.ladder = size_ladder(max_num_tokens)
        cfg, n = model.config, self.ladder[-1]
        dtype = model.embed_tokens.weight.dtype
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.residual = torch.zeros(n, cfg.hidden_size, dtype=dtype, device=device)
        num_heads = model.attention_layers()[0].num_heads  # this rank's
        self.queries = torch.zeros(n, num_heads, cfg.head_dim, dtype=dtype, device=device)
        self.attn_out = torch.zeros(n, num_heads, cfg.head_dim, dtype=dtype, device=device)
        self.hidden = torch.zeros(n, cfg.hidden_size, dtype=dtype, device=device)
        self.pieces: dict[int, list[Callable[[], None]]] = {rung: self._pieces(rung) for rung in self.ladder}

    def _pieces(self, rung: int) -> list[Callable[[], None]]:
        model, layers = self.model, self.model.layers
        ids, positions, slots = self.input_ids[:rung], self.positions[:rung], self.slot_mapping[:rung]
        residual, queries, attn_out = self.residual[:rung], self.queries[:rung], self.attn_out[:rung]

        def first() -> None:
            residual.copy_(model.embed_tokens(ids))
            layers[0].before_attention(None, residual, positions, slots, q_out=queries)

        def between(i: int) -> None:
            x = layers[i - 1].after_attention(attn_out, residual)
            layers[i].before_attention(x, residual, positions, slots, q_out=queries)

        def last() -> None:
            self.hidden[:rung].copy_(model.norm(layers[-1].after_attention(attn_out, residual), residual))

        return [first, *(functools.partial(between, i) for i in range(1, len(layers))), last]

    def capture(self, pool: tuple[int, int]) -> None:
        """Capture every rung's pieces, largest rung first so the smaller ones reuse its memory."""
        cost = CaptureCost(self.residual.device)
        for rung in reversed(self.ladder):
            self.pieces[rung] = [capture(piece, pool)[0].replay for piece in self.pieces[rung]]
        logger.info("captured %d piecewise CUDA graphs for mixed steps in %s: %d token counts up to %d",
                    sum(map(len, self.pieces.values())), cost, len(self.ladder), self.ladder[-1])

    def can_run(self, num_tokens: int) -> bool:
        return padded_batch_size(self.ladder, num_tokens) is not None

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states [T, hidden] after the final norm, as `model(input_ids, positions, meta)`."""
        num_tokens = input_ids.shape[0]
        rung = padded_batch_size(self.ladder, num_tokens)
        self.input_ids[:num_tokens].copy_(input_ids)
        self.positions[:num_tokens].copy_(positions)
        self.slot_mapping[:num_tokens].copy_(meta.slot_mapping)
        self.slot_mapping[num_tokens:rung].fill_(-1)
        queries, attn_out = self.queries[:num_tokens], self.attn_out[:num_tokens]
        pieces = self.pieces[rung]
        for layer, piece in zip(self.model.layers, pieces):
            piece()
            layer.self_attn.attn.attend(queries, meta, out=attn_out)
        pieces[-1]()
        return self.hidden[:num_tokens]
