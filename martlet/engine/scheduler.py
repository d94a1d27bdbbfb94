"""Iteration-level continuous batching.

Every step the scheduler picks which sequences run and how many of their tokens. Running
sequences go first, oldest first: one token each for decodes (plus the proposals a speculating
decode verifies), the next chunk for prompts being prefilled in pieces. Waiting sequences then
join, first come first served, while the token budget, the sequence limit and the free blocks
allow. When a running sequence needs a block and none is free, the newest running sequence is
preempted: its blocks are freed and it goes back to the front of the queue, to be recomputed from
its prompt and the tokens it already produced.

The scheduler knows token counts and blocks, never tensors.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from martlet.engine.block_manager import BlockManager
from martlet.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    # Prefills and verifying decodes (several new tokens) first, then decodes (one new token), longest first.
    seqs: list[Sequence]
    num_new_tokens: list[int]
    num_prefills: int

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __bool__(self) -> bool:
        return bool(self.seqs)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int) -> None:
        self.block_manager = block_manager
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence, first: bool = False) -> None:
        """Queue a sequence: last, or first (a fork of a running one, which shares its blocks now)."""
        if first:
            self.waiting.appendleft(seq)
        else:
            self.waiting.append(seq)

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        chosen: list[tuple[Sequence, int]] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.has_pending_token and seq.reached_length_limit(self.max_model_len):
                i += 1  # its last token, still being sampled, ends it: nothing to compute
                continue
            num_new = self._num_running_tokens(seq, budget)
            while not self.block_manager.can_allocate(seq, num_new):
                if seq.spec_token_ids:  # verifying guesses is not worth a preemption
                    num_new -= len(seq.spec_token_ids)
                    seq.spec_token_ids.clear()
                    continue
                preempted = True
                victim = self.running.pop()
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                self.block_manager.allocate(seq, num_new)
                chosen.append((seq, num_new))
                budget -= num_new
                i += 1
        # A step that had to preempt is short of blocks: admitting newcomers would only thrash.
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not seq.block_table:
                self.block_manager.match_prefix(seq)
            num_new = min(seq.num_uncomputed_tokens, budget)
            if not self.block_manager.can_allocate(seq, num_new):
                self.block_manager.free(seq)  # give back any prefix blocks it took
                break
            self.block_manager.allocate(seq, num_new)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            if seq.metrics.first_scheduled_time is None:
                seq.metrics.first_scheduled_time = time.perf_counter()
            self.running.append(seq)
            chosen.append((seq, num_new))
            budget -= num_new
        return _order(chosen)

    @staticmethod
    def _num_running_tokens(seq: Sequence, budget: int) -> int:
        """Its uncomputed tokens and then its proposals, as many as the budget takes (the proposals
        it leaves out are dropped)."""
        num_new = min(seq.num_uncomputed_tokens, budget)
        del seq.spec_token_ids[budget - num_new :]
        return num_new + len(seq.spec_token_ids)

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.spec_token_ids.clear()
        seq.status = SequenceStatus.WAITING
        seq.metrics.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        """Take a sequence out for good (finished or aborted) and free its blocks."""
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        seq.metrics.finished_time = time.perf_counter()
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)


def _order(chosen: list[tuple[Sequence, int]]) -> ScheduledBatch:
    prefills = [(s, n) for s, n in chosen if n > 1]
    # Longest context first: the decode attention kernel then starts its longest programs first, so
    # no long one is left running alone at the end of the launch.
    decodes = sorted(((s, n) for s, n in chosen if n == 1), key=lambda c: -len(c[0]))
    ordered = prefills + decodes
    return ScheduledBatch(
        seqs=[s for s, _ in ordered], num_new_tokens=[n for _, n in ordered], num_prefills=len(prefills)
    )
