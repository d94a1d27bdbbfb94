"""Speculative decoding: guess the next tokens cheaply, verify them all in one step of the target.

Prompt lookup (n-gram): text that repeats (quoting, editing, code) continues the way it did before:
the tokens that followed an earlier occurrence of a sequence's last n tokens are a good guess for
what follows now. A draft model: a smaller model with the same vocabulary guesses greedily. Medusa
heads guess from the target's last hidden state; EAGLE runs a decoder layer over the target's
hidden states (`martlet/models/speculators.py`).

The next step feeds the sequence's last token and the k guesses to the model at once (k + 1
query tokens, laid out like a prompt chunk), and the sampler checks each guess against the
target's own choice at that position (`Sampler`, rejection sampling). The engine keeps the
leading guesses that pass plus the target's token after them, so each verification step makes 1
to k + 1 tokens, exactly the tokens (greedy) or the distribution (sampling) of decoding one at a
time. The K/V written for rejected guesses stay in the sequence's blocks beyond its computed
tokens, where the next steps overwrite them. Medusa may verify a tree of guesses instead of a chain
for a greedy request (`tree_rows`, `accepted_path`)."""

from __future__ import annotations

import weakref

import numpy as np
import torch

from martlet.config import EngineConfig, ModelConfig, SpeculativeConfig
from martlet.device import to_device
from martlet.engine.cuda_graphs import DecodeGraphs
from martlet.engine.flat_batch import block_table_array, flat_batch
from martlet.engine.scheduler import ScheduledBatch
from martlet.engine.sequence import PLACEHOLDER, Sequence
from martlet.layers.attention import AttentionBackend, AttentionMetadata
from martlet.layers.sampler import has_penalty
from martlet.models.llama import LlamaForCausalLM
from martlet.models.loader import build_model, read_model_config
from martlet.models.speculators import EagleModel, MedusaHeads, load_eagle, load_medusa_heads

# Above this many running sequences no step speculates: a batch that large already keeps the GPU's
# arithmetic busy, and verifying guesses would cost more than it saves. A first guess, not tuned; with
# it, n-gram speculation made the ShareGPT-like workload 2.4% faster on an H200, where the issue
# asks for no more than 3% slower (benchmarks/results/spec-decode-H200-2026-12-03.md).
MAX_SPECULATIVE_BATCH = 32


class Proposer:
    """What the proposers share: which sequences may speculate, and how many proposals fit.

    The engine asks `propose` for each running sequence before scheduling, so that the scheduler
    makes room for the proposals, then `draft` with the scheduled batch: a proposer that runs a
    model proposes placeholders first and fills them in there, for the sequences that got room.
    The model runner serves the proposer's other needs: a KV pool for its `model`, a pool of the
    target's hidden state per cache slot (`features`, `feature_size` wide), and a call with the
    hidden states the target samples from (`guess_from_hidden`).
    """

    model: LlamaForCausalLM | None = None  # a model whose K/V the engine's KV pool holds too
    feature_size = 0
    features: torch.Tensor | None = None  # [cache slots, feature_size], once the pool exists

    def __init__(self, config: SpeculativeConfig, max_model_len: int) -> None:
        self.config = config
        self.max_model_len = max_model_len

    def propose(self, seq: Sequence) -> list[int]:
        """Up to k tokens to verify after `seq`'s last one; none if it may not speculate now. A chain,
        unless the proposer sets `seq.spec_parents` (a tree)."""
        seq.spec_parents = []
        if not self.may_speculate(seq):
            return []
        k = min(self.config.num_speculative_tokens, self._room(seq))
        return self._guess(seq, k) if k >= 1 else []

    def _guess(self, seq: Sequence, k: int) -> list[int]:
        raise NotImplementedError

    def draft(self, batch: ScheduledBatch) -> None:
        """Fill in the scheduled sequences' placeholder proposals (none here)."""

    def capture_graphs(self) -> None:
        """CUDA graphs of the proposer's own steps, once the KV pool exists (none here)."""

    def guess_from_hidden(self, hidden: torch.Tensor, num_seqs: int) -> torch.Tensor | None:
        """Guesses [rows, k] of the tokens after each sampled row's, from its hidden state, in a step
        that samples for `num_seqs` sequences (none here)."""
        return None

    def _room(self, seq: Sequence) -> int:
        """Guesses that fit before max_tokens or the context runs out (the step adds one token of its own)."""
        max_tokens = seq.params.max_tokens or self.max_model_len
        return min(max_tokens - seq.num_output_tokens, self.max_model_len - len(seq)) - 1

    @staticmethod
    def may_speculate(seq: Sequence) -> bool:
        """A decoding sequence whose sampling does not depend on the tokens before each row: penalties,
        grammars and min_tokens do, and logprobs are reported one row per step."""
        params = seq.params
        return (seq.num_uncomputed_tokens == 1 and seq.grammar is None and not has_penalty(seq)
                and params.logprobs is None and seq.num_output_tokens >= params.min_tokens)


class NgramProposer(Proposer):
    def __init__(self, config: SpeculativeConfig, max_model_len: int) -> None:
        super().__init__(config, max_model_len)
        # Per sequence, its tokens as an array and how many of them are final: converting the whole
        # list each step cost 58 us at 2,000 tokens (284 at 8,000), 6x the search itself.
        self.arrays: weakref.WeakKeyDictionary[Sequence, tuple[np.ndarray, int]] = weakref.WeakKeyDictionary()

    def _guess(self, seq: Sequence, k: int) -> list[int]:
        return find_continuation(self._tokens(seq), k, self.config.prompt_lookup_min, self.config.prompt_lookup_max)

    def _tokens(self, seq: Sequence) -> np.ndarray:
        """`seq`'s tokens as an array, extended by the ones new since the last call. All but the last
        are final; the last may be a placeholder for a token still being sampled, so it is copied again."""
        tokens = seq.token_ids
        array, num_final = self.arrays.get(seq, (np.empty(0, np.int64), 0))
        if len(array) < len(tokens):  # room to grow, so that appending stays amortized O(1)
            array = np.concatenate([array[:num_final], np.empty(2 * len(tokens) - num_final, np.int64)])
        array[num_final : len(tokens)] = tokens[num_final:]
        self.arrays[seq] = (array, len(tokens) - 1)
        return array[: len(tokens)]


class MedusaProposer(Proposer):
    """Medusa heads guess from the hidden state the target sampled a sequence's last token from:
    the model runner runs them on every sampled row, and the engine keeps the accepted row's guesses
    (`seq.guessed_token_ids`: each head's top guesses). A chain of each head's top guess, or for a
    greedy request the configured tree of top-k paths (its first branch first, so that a run
    accepted along it is where its positions are, and need not be computed again)."""

    def __init__(self, config: SpeculativeConfig, max_model_len: int, heads: MedusaHeads) -> None:
        super().__init__(config, max_model_len)
        self.heads = heads
        tree = config.speculative_token_tree
        self.tree = None if tree is None else sorted(tree, key=lambda node: (any(node), len(node), node))
        self.top_k = 1 if tree is None else 1 + max(max(node) for node in tree)

    def _guess(self, seq: Sequence, k: int) -> list[int]:
        guesses = seq.guessed_token_ids
        if not guesses:
            return []
        if self.tree is None or not seq.params.greedy:
            return [guesses[head * self.top_k] for head in range(k)]
        nodes = [node for node in self.tree if len(node) <= k]
        row_of = {node: row for row, node in enumerate(nodes, start=1)}
        seq.spec_parents = [row_of.get(node[:-1], 0) for node in nodes]
        return [guesses[(len(node) - 1) * self.top_k + node[-1]] for node in nodes]

    def guess_from_hidden(self, hidden: torch.Tensor, num_seqs: int) -> torch.Tensor | None:
        # A batch too large to speculate next step does not pay for the heads.
        return self.heads(hidden, self.top_k).flatten(1) if num_seqs <= MAX_SPECULATIVE_BATCH else None


class DraftModelProposer(Proposer):
    """A smaller model with the target's vocabulary proposes its own greedy tokens: k of its decode
    steps per verification step.

    Its K/V sit in a pool of its own with the target's block count and size, so the sequence's block
    table and cache slots serve both models: every position the draft writes is one the target
    writes in the same step, so it is allocated, and freed, with the target's. The draft first
    catches up on the tokens it has not seen (the prompt, the tokens of the last verification step),
    at most max_num_batched_tokens a pass, and the last of them gives the first guess; each guess then
    is the input of a decode step that gives the next. `seq.num_draft_computed_tokens` counts its
    K/V, cut back with the target's when proposals are rejected or the sequence is preempted.

    A greedy draft is a point mass, so the sampler's rejection rule (`Sampler._verify`) keeps the
    target's distribution for sampled requests too.
    """

    shift = 0  # the draft's position t reads token t + shift

    def __init__(self, config: SpeculativeConfig, engine: EngineConfig, model: LlamaForCausalLM) -> None:
        super().__init__(config, engine.max_model_len)
        self.model = model
        self.max_num_batched_tokens = engine.max_num_batched_tokens
        self.block_size = engine.block_size
        self.device = engine.device
        self.decode_graphs: DecodeGraphs | None = None

    def capture_graphs(self) -> None:
        """The draft's decode steps (all but its first per verification step) as CUDA graphs, in a pool
        of their own: a small model's step is mostly kernel launches."""
        self.decode_graphs = DecodeGraphs(self.model, MAX_SPECULATIVE_BATCH, self.max_model_len, self.block_size,
                                          self.device, torch.cuda.graph_pool_handle())

    def _guess(self, seq: Sequence, k: int) -> list[int]:
        return [PLACEHOLDER] * k

    @torch.inference_mode()
    def draft(self, batch: ScheduledBatch) -> None:
        seqs = [seq for seq in batch.seqs if seq.spec_token_ids]
        if not seqs:
            return
        counts = [len(seq.spec_token_ids) for seq in seqs]
        guesses = torch.empty(len(seqs), max(counts), dtype=torch.int64, device=self.device)
        hidden = self._catch_up(seqs, guesses)
        tables = block_table_array([seq.block_table for seq in seqs])  # the guesses' slots are allocated
        for i in range(1, max(counts)):
            rows = [j for j, n in enumerate(counts) if n > i]
            active = [seqs[j] for j in rows]
            rows_t = to_device(rows, self.device, torch.int64)
            positions, meta = flat_batch([len(seq) - 1 - self.shift + i for seq in active], [1] * len(active),
                                         tables[rows], 0, self.block_size, self.device)
            if self.decode_graphs is not None and self.decode_graphs.can_run(meta):
                out, logits = self.decode_graphs.run(guesses[rows_t, i - 1], positions, meta)
            else:
                out = self._run(guesses[rows_t, i - 1], positions, meta, hidden[rows_t])
                logits = self.model.compute_logits(out)
            hidden[rows_t] = out
            guesses[rows_t, i] = logits.argmax(dim=-1)
        for seq, n, row in zip(seqs, counts, guesses.tolist()):
            seq.spec_token_ids = row[:n]
            seq.num_draft_computed_tokens = self._num_computed_after(seq, n)

    def _catch_up(self, seqs: list[Sequence], guesses: torch.Tensor) -> torch.Tensor:
        """Run the draft over each sequence's positions it has no K/V for; the last one's greedy token
        is the sequence's first guess (column 0 of `guesses`). Returns the last one's hidden state."""
        hidden = None
        starts = [seq.num_draft_computed_tokens for seq in seqs]
        ends = [len(seq) - self.shift for seq in seqs]
        while True:
            budget, chunk = self.max_num_batched_tokens, []  # (row, start, count)
            for row, (start, end) in enumerate(zip(starts, ends)):
                n = min(end - start, budget)
                if n > 0:
                    chunk.append((row, start, n))
                    budget -= n
            if not chunk:
                return hidden
            chunk.sort(key=lambda c: c[2] == 1)  # several tokens first, as the attention metadata wants
            input_ids = [t for row, start, n in chunk
                         for t in seqs[row].token_ids[start + self.shift : start + self.shift + n]]
            positions, meta = flat_batch([start for _, start, _ in chunk], [n for _, _, n in chunk],
                                         block_table_array([seqs[row].block_table for row, _, _ in chunk]),
                                         sum(n > 1 for _, _, n in chunk), self.block_size, self.device)
            out = self._run(to_device(input_ids, self.device, torch.int64), positions, meta,
                            self._catch_up_features(meta))
            done = [(row, end - 1) for (row, start, n), end in zip(chunk, meta.query_start_loc_cpu[1:])
                    if start + n == ends[row]]
            if done:
                rows, last = (to_device(list(x), self.device, torch.int64) for x in zip(*done))
                hidden = out.new_empty(len(seqs), out.shape[1]) if hidden is None else hidden
                hidden[rows] = out[last]
                guesses[rows, 0] = self.model.compute_logits(out[last]).argmax(dim=-1)
            for row, start, n in chunk:
                starts[row] = start + n

    def _run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
             features: torch.Tensor | None) -> torch.Tensor:
        return self.model(input_ids, positions, meta)

    def _catch_up_features(self, meta: AttentionMetadata) -> torch.Tensor | None:
        return None

    def _num_computed_after(self, seq: Sequence, num_guesses: int) -> int:
        return len(seq) + num_guesses - 1  # its own inputs were tokens: the accepted guesses' K/V stand


class EagleProposer(DraftModelProposer):
    """EAGLE: a draft whose position t reads token t + 1 and the target's hidden state at t, kept per
    cache slot by the model runner (`features`). Its guesses beyond the target's known hidden states
    read its own output in their place, so their K/V are recomputed once the target's are known."""

    shift = 1

    def __init__(self, config: SpeculativeConfig, engine: EngineConfig, model: EagleModel) -> None:
        super().__init__(config, engine, model)
        self.feature_size = model.config.hidden_size

    def capture_graphs(self) -> None:
        pass  # its steps read features too, which DecodeGraphs do not hold

    def _run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
             features: torch.Tensor | None) -> torch.Tensor:
        return self.model(input_ids, positions, meta, features)

    def _catch_up_features(self, meta: AttentionMetadata) -> torch.Tensor:
        return self.features[meta.slot_mapping]

    def _num_computed_after(self, seq: Sequence, num_guesses: int) -> int:
        return len(seq) - 1


def make_proposer(engine: EngineConfig, target_config: ModelConfig, target: LlamaForCausalLM,
                  backend: AttentionBackend, quiet: bool) -> Proposer:
    """The proposer `engine.speculative_config` asks for, with its model loaded if it has one."""
    config = engine.speculative_config
    k, device = config.num_speculative_tokens, engine.device
    if config.method == "ngram":
        return NgramProposer(config, engine.max_model_len)
    if config.method == "medusa":
        return MedusaProposer(config, engine.max_model_len,
                              load_medusa_heads(config.model, target_config, k, engine.dtype, device))
    if config.method == "eagle":
        model = load_eagle(config.model, target, backend, dtype=engine.dtype, device=device,
                           max_positions=engine.max_model_len, load_format=engine.load_format)
        return EagleProposer(config, engine, model)
    draft = read_model_config(config.model)
    if draft.vocab_size != target_config.vocab_size:
        raise ValueError(f"speculative_config: the draft model {config.model} has a vocabulary of "
                         f"{draft.vocab_size} tokens, the target {target_config.vocab_size}: they must share one")
    model = build_model(config.model, draft, backend, dtype=engine.dtype, device=device,
                        max_positions=engine.max_model_len, load_format=engine.load_format, quiet=quiet)
    return DraftModelProposer(config, engine, model)


def find_continuation(tokens: np.ndarray, k: int, min_n: int, max_n: int) -> list[int]:
    """The up to `k` tokens that followed an earlier occurrence of the last n tokens, for the largest
    n in [min_n, max_n] that occurred before; [] if none did. The occurrence is the latest that k
    tokens follow (the freshest context), or if none is, the earliest (the most tokens): in a run of
    one repeated token the latest occurrence ends just before the last token, and would give one.

    One pass over the tokens finds where the last token occurred before (not at the end, so a token
    follows each); each longer n then keeps the places where the token before matches too.
    """
    ends = np.flatnonzero(tokens[:-1] == tokens[-1])  # where earlier occurrences end
    n = 1
    while n < max_n and ends.size:
        longer = ends[ends >= n]
        longer = longer[tokens[longer - n] == tokens[-1 - n]]
        if not longer.size:
            break
        ends, n = longer, n + 1
    if not ends.size or n < min_n:
        return []
    followed_by_k = ends[ends < len(tokens) - k]
    end = followed_by_k[-1] if followed_by_k.size else ends[0]
    return tokens[end + 1 : end + 1 + k].tolist()


def tree_rows(parents: list[int], num_own: int) -> tuple[list[int], list[int]]:
    """A verification chunk of the sequence's `num_own` uncomputed tokens, the last of them the tree's
    root, then proposals whose parents are `parents` (rows counted from the root): per row, how far
    its position is behind its row (a node sits at its depth) and its tree mask (`AttentionMetadata`)."""
    root = num_own - 1
    offsets, bits, depths = [0] * num_own, [(1 << (i + 1)) - 1 for i in range(num_own)], [0]
    for node, parent in enumerate(parents, start=1):
        depths.append(depths[parent] + 1)
        offsets.append(node - depths[node])
        bits.append(bits[root + parent] | 1 << (root + node))
    return offsets, [b - (1 << 64) if b >> 63 else b for b in bits]  # as int64


def accepted_path(drafts: tuple[int, ...], parents: list[int], sampled: list[int]) -> tuple[list[int], int, int]:
    """A tree verification step's tokens, the row the last one was sampled at, and how many of the
    accepted proposals sit at their own position (rows 1, 2, ... in order). `sampled[r]` is the
    target's token after row r (row 0 the root, row i the proposal `drafts[i - 1]`): from the root,
    each child whose proposal is that token is taken, until none is."""
    row, tokens, in_place = 0, [], 0
    while True:
        tokens.append(sampled[row])
        child = next((i for i, (d, p) in enumerate(zip(drafts, parents), start=1)
                      if p == row and d == tokens[-1]), None)
        if child is None:
            return tokens, row, in_place
        in_place += child == len(tokens) == in_place + 1
        row = child


def accepted_prefix(drafts: tuple[int, ...], sampled: list[int]) -> list[int]:
    """The tokens a verification step makes. `sampled[i]` is the sampler's token for the position
    after `drafts[:i]`: the draft itself where the sampler accepted it, its own choice otherwise.
    The drafts up to the first one not accepted stand, then the sampler's token there (or after the
    last draft, if all were accepted)."""
    num_accepted = 0
    while num_accepted < len(drafts) and sampled[num_accepted] == drafts[num_accepted]:
        num_accepted += 1
    return sampled[: num_accepted + 1]
