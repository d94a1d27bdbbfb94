"""The model runner's flat batch (positions, cache slots and metadata of a mixed step), and the
pieces a mixed step's CUDA graphs are captured from."""

import pytest
import torch

from martlet.engine.cuda_graphs import MixedStepGraphs
from martlet.engine.scheduler import ScheduledBatch
from martlet.engine.sequence import PLACEHOLDER, Sequence
from martlet.sampling_params import SamplingParams


def sequence(name: str, num_tokens: int, computed: int, blocks: list[int]) -> Sequence:
    seq = Sequence(name, list(range(100, 100 + num_tokens)), SamplingParams(), eos_token_ids=[])
    seq.num_computed_tokens = computed
    seq.block_table = blocks
    return seq


def test_prepare_mixed_step(tiny_llm):
    runner = tiny_llm.engine.runner
    bs = runner.block_size
    chunk = sequence("chunk", 50, 20, [7, 3, 9, 4])  # prompt tokens 20..32 of 50: no logits yet
    last = sequence("last", 10, 4, [5])  # the rest of its prompt: logits for token 9
    decode = sequence("decode", 40, 39, [1, 8, 2])
    decode.token_ids[-1] = PLACEHOLDER  # still being sampled by the step before
    decode.sample_row = 0
    batch = ScheduledBatch([chunk, last, decode], [13, 6, 1], num_prefills=2)
    saved, runner.last_token_ids = runner.last_token_ids, torch.tensor([77])
    try:
        step = runner._plan(batch)
        input_ids, positions, meta = runner._tensors(step)
    finally:
        runner.last_token_ids = saved

    expected_positions = [*range(20, 33), *range(4, 10), 39]
    assert positions.tolist() == expected_positions
    tables = {0: chunk.block_table, 1: last.block_table, 2: decode.block_table}
    owners = [0] * 13 + [1] * 6 + [2]
    assert meta.slot_mapping.tolist() == [tables[o][p // bs] * bs + p % bs for o, p in zip(owners, expected_positions)]
    assert input_ids.tolist() == [*range(120, 133), *range(104, 110), 77]
    assert meta.query_start_loc.tolist() == meta.query_start_loc_cpu == [0, 13, 19, 20]
    assert meta.seq_lens.tolist() == meta.seq_lens_cpu == [33, 10, 40]
    assert meta.block_tables.tolist() == [[7, 3, 9, 4], [5, 0, 0, 0], [1, 8, 2, 0]]
    assert (meta.num_prefills, meta.num_prefill_tokens, meta.num_decodes) == (2, 19, 1)
    assert (meta.max_query_len, meta.max_seq_len) == (13, 40)
    assert step.logits_indices == [18, 19]


def test_prepare_refuses_a_position_without_a_block(tiny_llm):
    seq = sequence("short", 40, 0, [1, 2])  # 32 slots for 40 tokens
    with pytest.raises(RuntimeError, match="no cache block for position 39"):
        tiny_llm.engine.runner._plan(ScheduledBatch([seq], [40], num_prefills=1))


def test_mixed_step_pieces_match_the_model(tiny_llm):
    """The pieces of the mixed-step graphs, run eagerly (uncaptured), give the model's hidden states
    and cache writes, with the step padded from 20 tokens to the rung of 24."""
    runner = tiny_llm.engine.runner
    chunk = sequence("chunk", 50, 20, [7, 3, 9, 4])
    last = sequence("last", 10, 4, [5])
    decode = sequence("decode", 40, 39, [1, 8, 2])
    batch = ScheduledBatch([chunk, last, decode], [13, 6, 1], num_prefills=2)
    input_ids, positions, meta = runner._tensors(runner._plan(batch))
    pieces = MixedStepGraphs(runner.model, 32, runner.device)
    assert pieces.ladder == [1, 2, 4, 8, 16, 24, 32]

    untouched = runner.kv_cache.clone()
    try:
        runner.kv_cache.copy_(torch.randn_like(untouched))  # a context already in the cache
        before = runner.kv_cache.clone()
        expected = runner.model(input_ids, positions, meta)
        expected_cache = runner.kv_cache.clone()
        runner.kv_cache.copy_(before)
        hidden = pieces.run(input_ids, positions, meta)
        torch.testing.assert_close(hidden, expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(runner.kv_cache, expected_cache), "padding tokens must write nowhere"
    finally:
        runner.kv_cache.copy_(untouched)
