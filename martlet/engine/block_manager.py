"""The KV cache pool: fixed-size blocks, handed out to sequences and counted by reference.

A full block is also remembered by the hash of its tokens and of everything before it, so a later
sequence with the same prefix (a shared system prompt, a preempted sequence coming back) takes
the block as it is instead of recomputing it. Free blocks keep their contents and hash until
they are handed out again, least recently freed first.
"""

from __future__ import annotations

from collections import OrderedDict

from martlet.engine.sequence import PLACEHOLDER, Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] = ()


def block_hash(parent: int | None, token_ids: tuple[int, ...]) -> int:
    return hash((parent, token_ids))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[int, int] = {}  # hash -> block id
        self.enable_prefix_caching = enable_prefix_caching
        self.num_hit_tokens = 0  # prompt tokens served from the cache, for metrics

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_ids)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def match_prefix(self, seq: Sequence) -> None:
        """Give a sequence with no blocks yet the cached blocks of its longest known prefix.

        At least one token is left uncomputed: the step must produce that token's logits.
        """
        assert not seq.block_table and seq.num_computed_tokens == 0
        if not self.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            return  # prompt logprobs need every prompt position computed
        parent = None
        for start in range(0, len(seq) - 1 - self.block_size + 1, self.block_size):
            tokens = tuple(seq.token_ids[start : start + self.block_size])
            h = block_hash(parent, tokens)
            block_id = self.cached.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            self._take(block_id)
            seq.block_table.append(block_id)
            seq.num_hashed_blocks += 1
            seq.num_computed_tokens += self.block_size
            self.num_hit_tokens += self.block_size
            parent = h

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Give `child`, a sibling with the same prompt and no blocks yet, the full blocks of the prompt
        `parent` has computed, shared by reference; it computes only the tokens after them (and at
        least its last prompt token, whose logits it samples from)."""
        assert not child.block_table and child.num_computed_tokens == 0
        num_full = min(parent.num_computed_tokens, child.num_prompt_tokens - 1) // self.block_size
        for block_id in parent.block_table[:num_full]:
            self._take(block_id)
            child.block_table.append(block_id)
        child.num_hashed_blocks = min(num_full, parent.num_hashed_blocks)
        child.num_computed_tokens = num_full * self.block_size

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        needed = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        return needed <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Make room for the next `num_new_tokens` of `seq`, and hash blocks they fill."""
        total = seq.num_computed_tokens + num_new_tokens
        while len(seq.block_table) < self.blocks_needed(total):
            block_id = next(iter(self.free_ids))
            self._forget(block_id)
            self._take(block_id)
            seq.block_table.append(block_id)
        if self.enable_prefix_caching:  # proposals past the sequence's own tokens are unverified: never hashed
            self._remember_full_blocks(seq, min(total, len(seq)) // self.block_size)

    def free(self, seq: Sequence) -> None:
        # The tail is freed first so it is reused first: its prefix is the more valuable part.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_ids[block_id] = None
        seq.block_table.clear()
        seq.num_hashed_blocks = 0
        seq.num_computed_tokens = seq.num_draft_computed_tokens = 0

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_ids[block_id]
        block.ref_count += 1

    def _forget(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.hash is not None and self.cached.get(block.hash) == block_id:
            del self.cached[block.hash]
        block.hash, block.token_ids = None, ()

    def _remember_full_blocks(self, seq: Sequence, num_full: int) -> None:
        """Register the sequence's full blocks for prefix caching, in order (each hash chains its
        parent's), stopping at a block that still holds a token not sampled yet."""
        while seq.num_hashed_blocks < num_full:
            index = seq.num_hashed_blocks
            tokens = tuple(seq.token_ids[index * self.block_size : (index + 1) * self.block_size])
            if PLACEHOLDER in tokens:
                return
            block = self.blocks[seq.block_table[index]]
            if block.hash is None:
                parent = self.blocks[seq.block_table[index - 1]].hash if index else None
                block.hash, block.token_ids = block_hash(parent, tokens), tokens
                self.cached.setdefault(block.hash, block.block_id)
            seq.num_hashed_blocks += 1
