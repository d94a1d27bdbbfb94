"""Flat batches: sequences' new tokens laid end to end, as the model and the attention kernels take
them, with each token's position and cache slot and the batch's attention metadata. The model
runner builds its steps this way, and so do the speculative proposers their draft and verify steps.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from martlet.device import to_device
from martlet.layers.attention import AttentionMetadata


def block_table_array(block_tables: list[list[int]]) -> np.ndarray:
    """Sequences' block tables as one int32 array, rows padded with block 0: built in numpy, not by
    torch.tensor over nested lists (at 256 sequences that was a millisecond a step), and pickled to
    tensor-parallel workers as one buffer, not as lists of ints."""
    tables = np.zeros((len(block_tables), max(map(len, block_tables))), dtype=np.int32)
    for row, table in zip(tables, block_tables):
        row[: len(table)] = table
    return tables


def flat_batch(starts: list[int], counts: list[int], tables: np.ndarray, num_prefills: int,
               block_size: int, device: torch.device, position_offsets: list[int] | None = None,
               tree_mask: list[int] | None = None) -> tuple[torch.Tensor, AttentionMetadata]:
    """Positions and attention metadata of a flat batch: sequence i's `counts[i]` new tokens start at
    position `starts[i]`, its blocks are row i of `tables` (`block_table_array`), and the first
    `num_prefills` sequences have more than one new token. A tree of
    proposals takes cache slots in order but positions by depth: `position_offsets` per token."""
    query_start_loc = [0, *itertools.accumulate(counts)]
    seq_lens = [start + n for start, n in zip(starts, counts)]
    # Each new token's position and the cache slot its K/V go to, for the whole batch at once.
    positions = np.repeat(np.subtract(starts, query_start_loc[:-1]), counts) + np.arange(query_start_loc[-1])
    bs = block_size
    slots = tables[np.repeat(np.arange(len(starts)), counts), positions // bs].astype(np.int64) * bs + positions % bs

    def tensor(values: list | np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        return to_device(values, device, dtype)

    meta = AttentionMetadata(
        slot_mapping=tensor(slots, torch.int64),
        query_start_loc=tensor(query_start_loc, torch.int32),
        seq_lens=tensor(seq_lens, torch.int32),
        block_tables=tensor(tables, torch.int32),
        num_prefills=num_prefills,
        num_prefill_tokens=query_start_loc[num_prefills],
        num_decodes=len(starts) - num_prefills,
        max_query_len=max(counts),
        max_seq_len=max(seq_lens),
        query_start_loc_cpu=query_start_loc,
        seq_lens_cpu=seq_lens,
        tree_mask=None if tree_mask is None else tensor(tree_mask, torch.int64),
    )
    if position_offsets is not None:
        positions = positions - np.asarray(position_offsets)
    return tensor(positions, torch.int64), meta
