"""The KV block pool: allocation, reference counts, prefix caching, freeing, and a random-operation
fuzz that checks the pool's invariants and that every sequence only ever sees its own tokens."""

from __future__ import annotations

import random

import pytest

import martlet.engine.block_manager as bm_module
from martlet.engine.block_manager import BlockManager
from martlet.engine.sequence import Sequence
from martlet.sampling_params import SamplingParams

BS = 4


def make_seq(tokens, rid="s") -> Sequence:
    return Sequence(rid, list(tokens), SamplingParams(), eos_token_ids=[])


def compute(bm: BlockManager, seq: Sequence, n: int | None = None) -> None:
    """What one engine step does to a sequence: make room for n new tokens, then count them."""
    n = seq.num_uncomputed_tokens if n is None else n
    assert bm.can_allocate(seq, n)
    bm.allocate(seq, n)
    seq.num_computed_tokens += n


def admit(bm: BlockManager, seq: Sequence) -> None:
    """A new sequence: take its cached prefix, then compute the rest."""
    bm.match_prefix(seq)
    compute(bm, seq)


def check_invariants(bm: BlockManager, seqs) -> None:
    refs = {}
    for seq in seqs:
        assert len(seq.block_table) == len(set(seq.block_table)), "a sequence holds a block twice"
        for b in seq.block_table:
            refs[b] = refs.get(b, 0) + 1
    assert sum(block.ref_count for block in bm.blocks) == sum(len(s.block_table) for s in seqs)
    for block in bm.blocks:
        assert block.ref_count == refs.get(block.block_id, 0)
        assert (block.ref_count == 0) == (block.block_id in bm.free_ids)
    assert bm.num_free_blocks + len(refs) == bm.num_blocks
    for h, block_id in bm.cached.items():
        assert bm.blocks[block_id].hash == h
    for seq in seqs:
        assert len(seq.block_table) >= bm.blocks_needed(seq.num_computed_tokens)


# ---- allocation, reference counts, freeing -----------------------------------------------------


def test_allocate_grows_block_by_block():
    bm = BlockManager(10, BS)
    seq = make_seq(range(10))
    assert bm.blocks_needed(10) == 3 and bm.blocks_needed(12) == 3 and bm.blocks_needed(13) == 4
    assert bm.can_allocate(seq, 10)
    compute(bm, seq)
    assert len(seq.block_table) == 3 and bm.num_free_blocks == 7
    assert all(bm.blocks[b].ref_count == 1 for b in seq.block_table)
    for step in range(2):  # tokens 11 and 12 fit the third block
        seq.append_token(100 + step)
        compute(bm, seq, 1)
        assert len(seq.block_table) == 3
    seq.append_token(200)
    compute(bm, seq, 1)
    assert len(seq.block_table) == 4 and bm.num_free_blocks == 6
    assert bm.usage == pytest.approx(0.4)
    check_invariants(bm, [seq])
    bm.free(seq)
    assert seq.block_table == [] and seq.num_computed_tokens == 0
    assert bm.num_free_blocks == 10 and bm.usage == 0.0
    check_invariants(bm, [])


def test_can_allocate_counts_blocks_already_held():
    bm = BlockManager(3, BS)
    a = make_seq(range(8))
    compute(bm, a)
    assert bm.num_free_blocks == 1
    b = make_seq(range(100, 109))
    assert not bm.can_allocate(b, 9)  # needs 3
    assert bm.can_allocate(b, 4)
    a.append_token(1)
    assert bm.can_allocate(a, 1)  # a 3rd block for a
    compute(bm, a, 1)
    assert not bm.can_allocate(b, 1)
    a.append_token(2)
    assert bm.can_allocate(a, 1)  # fits the block a already holds
    check_invariants(bm, [a])


def test_distinct_sequences_get_distinct_blocks():
    bm = BlockManager(8, BS, enable_prefix_caching=True)
    seqs = [make_seq(range(i * 100, i * 100 + 7), rid=str(i)) for i in range(4)]
    for s in seqs:
        admit(bm, s)
    tables = [b for s in seqs for b in s.block_table]
    assert len(tables) == len(set(tables)) == 8 and bm.num_free_blocks == 0
    check_invariants(bm, seqs)


# ---- prefix caching -----------------------------------------------------------------------------


def test_shared_prefix_reuses_full_blocks_not_the_partial_one():
    bm = BlockManager(16, BS)
    a = make_seq(list(range(10)))  # blocks [0..3], [4..7], partial [8, 9]
    admit(bm, a)
    b = make_seq(list(range(10)))
    bm.match_prefix(b)
    assert b.block_table == a.block_table[:2]
    assert b.num_computed_tokens == 8
    assert [bm.blocks[x].ref_count for x in a.block_table] == [2, 2, 1]
    compute(bm, b)
    assert b.block_table[2] != a.block_table[2]  # the partial block is never shared
    check_invariants(bm, [a, b])
    c = make_seq(list(range(6)) + [77, 78, 79])  # shares only the first block
    bm.match_prefix(c)
    assert c.block_table == a.block_table[:1] and c.num_computed_tokens == 4
    compute(bm, c)
    check_invariants(bm, [a, b, c])
    for s in (a, b, c):
        bm.free(s)
    assert bm.num_free_blocks == 16
    check_invariants(bm, [])


@pytest.mark.parametrize(("length", "matched"), [(4, 0), (5, 4), (8, 4), (9, 8), (12, 8), (13, 12)])
def test_prefix_match_always_leaves_a_token_to_compute(length, matched):
    bm = BlockManager(16, BS)
    a = make_seq(range(16))
    admit(bm, a)
    b = make_seq(range(length))
    bm.match_prefix(b)
    assert b.num_computed_tokens == matched
    assert b.num_uncomputed_tokens >= 1
    assert b.block_table == a.block_table[: matched // BS]


def test_prefix_needs_the_same_tokens_in_the_same_place():
    bm = BlockManager(16, BS)
    a = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    admit(bm, a)
    for tokens in ([9, 2, 3, 4, 5, 6, 7, 8, 9], [0, 1, 2, 3, 4, 5, 6, 7, 8], [5, 6, 7, 8, 1, 2, 3, 4, 9]):
        s = make_seq(tokens)
        bm.match_prefix(s)
        assert s.block_table == [] and s.num_computed_tokens == 0
    # same second block behind a different first block: the chain hash tells them apart
    s = make_seq([1, 2, 3, 0, 5, 6, 7, 8, 9])
    bm.match_prefix(s)
    assert s.block_table == []


def test_a_hash_collision_does_not_match(monkeypatch):
    monkeypatch.setattr(bm_module, "block_hash", lambda parent, tokens: 42)
    bm = BlockManager(8, BS)
    a = make_seq([1, 2, 3, 4, 5])
    admit(bm, a)
    assert 42 in bm.cached
    b = make_seq([9, 9, 9, 9, 9])
    bm.match_prefix(b)
    assert b.block_table == [] and b.num_computed_tokens == 0
    c = make_seq([1, 2, 3, 4, 0])
    bm.match_prefix(c)  # same tokens: a real match
    assert c.block_table == a.block_table[:1]


def test_blocks_are_hashed_only_once_full():
    bm = BlockManager(8, BS)
    a = make_seq([1, 2, 3, 4, 5, 6])
    admit(bm, a)
    assert bm.blocks[a.block_table[0]].hash is not None
    assert bm.blocks[a.block_table[1]].hash is None
    b = make_seq([1, 2, 3, 4, 5, 6, 7])
    bm.match_prefix(b)
    assert b.block_table == a.block_table[:1]  # the half-full block is not offered
    for t in (7, 8):
        a.append_token(t)
        compute(bm, a, 1)
    assert bm.blocks[a.block_table[1]].hash is not None
    c = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 0])
    bm.match_prefix(c)
    assert c.block_table == a.block_table[:2] and c.num_computed_tokens == 8


def test_chunked_allocation_hashes_each_block_it_fills():
    bm = BlockManager(8, BS)
    a = make_seq(range(13))
    for n in (3, 3, 3, 4):  # chunks that straddle block boundaries
        compute(bm, a, n)
    assert [bm.blocks[x].hash is not None for x in a.block_table] == [True, True, True, False]
    b = make_seq(range(13))
    bm.match_prefix(b)
    assert b.block_table == a.block_table[:3]


def test_cached_blocks_are_reused_after_being_freed():
    bm = BlockManager(6, BS)
    a = make_seq(range(9))
    admit(bm, a)
    table = list(a.block_table)
    bm.free(a)
    assert bm.num_free_blocks == 6
    b = make_seq(range(9))
    bm.match_prefix(b)
    assert b.block_table == table[:2] and b.num_computed_tokens == 8
    assert bm.num_free_blocks == 4  # taken back out of the free pool
    assert all(bm.blocks[x].ref_count == 1 for x in b.block_table)
    compute(bm, b)
    check_invariants(bm, [b])


def test_free_reuses_the_tail_first_so_the_prefix_survives():
    bm = BlockManager(4, BS)
    a = make_seq(range(16))  # four full blocks, all hashed
    compute(bm, a)
    table = list(a.block_table)
    bm.free(a)
    other = make_seq([500, 501, 502])
    compute(bm, other)  # one block: the last one a freed
    assert other.block_table == [table[-1]]
    b = make_seq(range(16))
    bm.match_prefix(b)
    assert b.block_table == table[:3]
    check_invariants(bm, [b, other])


def test_reallocated_blocks_are_forgotten():
    bm = BlockManager(3, BS)
    a = make_seq(range(9))
    admit(bm, a)
    bm.free(a)
    filler = make_seq(range(100, 112))  # takes all three blocks, overwriting a's contents
    compute(bm, filler)
    bm.free(filler)
    b = make_seq(range(9))
    bm.match_prefix(b)
    assert b.block_table == [] and b.num_computed_tokens == 0
    check_invariants(bm, [])


def test_no_prefix_caching_when_disabled():
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    a = make_seq(range(9))
    admit(bm, a)
    b = make_seq(range(9))
    bm.match_prefix(b)
    assert b.block_table == [] and not bm.cached


# ---- fuzz ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("prefix_caching", [True, False])
def test_random_operations_keep_the_pool_consistent(seed, prefix_caching):
    """Random admissions (with shared prefixes), chunked prefills, decodes, preemptions, resumes and
    frees. After every operation: reference counts equal block-table entries, free + referenced
    equals the pool, and every sequence reads back exactly its own tokens from its blocks (a
    shadow copy of what each slot holds checks that no shared block is ever overwritten and no
    cached block is matched for the wrong tokens)."""
    rng = random.Random(seed)
    bm = BlockManager(14, BS, enable_prefix_caching=prefix_caching)
    shadow: dict[int, dict[int, int]] = {}  # block id -> offset -> token written there
    live: list[Sequence] = []
    preempted: list[Sequence] = []
    prefixes = [[rng.randrange(3) for _ in range(rng.randrange(1, 14))] for _ in range(4)]
    hits = 0

    def step(seq: Sequence) -> bool:
        """Compute the next chunk of seq, or give its blocks back when the pool is short."""
        if seq.num_uncomputed_tokens == 0:
            seq.append_token(rng.randrange(3))
        n = rng.randint(1, seq.num_uncomputed_tokens)
        if not bm.can_allocate(seq, n):
            bm.free(seq)
            return False
        bm.allocate(seq, n)
        for p in range(seq.num_computed_tokens, seq.num_computed_tokens + n):
            shadow.setdefault(seq.block_table[p // BS], {})[p % BS] = seq.token_ids[p]
        seq.num_computed_tokens += n
        return True

    def start(seq: Sequence) -> None:
        nonlocal hits
        bm.match_prefix(seq)
        assert seq.num_uncomputed_tokens >= 1
        hits += seq.num_computed_tokens > 0
        (live if step(seq) else preempted).append(seq)

    for i in range(600):
        op = rng.random()
        if op < 0.25 or not live:
            tokens = rng.choice(prefixes) + [rng.randrange(3) for _ in range(rng.randrange(0, 6))]
            start(make_seq(tokens, rid=str(i)))
        elif op < 0.75:
            seq = rng.choice(live)
            if not step(seq):
                live.remove(seq)
                preempted.append(seq)
        elif op < 0.85 and preempted:
            start(preempted.pop(0))
        else:
            seq = live.pop(rng.randrange(len(live)))
            bm.free(seq)
            assert seq.block_table == []
        check_invariants(bm, live)
        for seq in live + preempted:
            for p in range(seq.num_computed_tokens):
                assert shadow[seq.block_table[p // BS]][p % BS] == seq.token_ids[p], (i, seq.request_id, p)
        for seq in preempted:
            assert seq.block_table == [] and seq.num_computed_tokens == 0
    assert (hits > 10) == prefix_caching  # the prefix cache was really exercised (or really off)
    for seq in live:
        bm.free(seq)
    check_invariants(bm, [])
    assert bm.num_free_blocks == bm.num_blocks
