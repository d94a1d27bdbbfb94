"""Causal flash attention over a packed batch of prompts (or prompt chunks), keys from the paged cache.

Reference: `martlet.layers.attention.paged_attention_reference`. The batch is the new tokens of
each sequence, concatenated with no padding (`query_start_loc` marks the boundaries). Sequence i
has `seq_lens[i]` tokens of context, its new ones last, all already in the cache; new token j sits
at position `seq_len - q_len + j` and sees every key up to it. Reading all keys through the block
table, rather than from the fresh k/v, is what lets a prompt attend to a cached prefix or to its own
earlier chunks.

One program takes BLOCK_M queries of one head of one sequence. Keys before its first query's
position are visible to all its rows and go through a loop with no mask; only the diagonal band,
at most BLOCK_M + BLOCK_N keys wide, pays for one.

A tree of guesses (speculative decoding) is verified as one chunk: `tree_mask`, one int64 per new
token, has bit i set where the token sees the sequence's new token i (its ancestors and itself),
on top of the causal rule. Nodes come in topological order (a parent before its children), the
root, node 0, is every node's ancestor, and a tree has at most 64 nodes; -1 (every bit) is plain
causal attention, as for the batch's other sequences. With a mask the band starts at the first
new token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from martlet.kernels.paged import (
    LOG2E,
    cache_strides,
    check_cache,
    dot_precision,
    load_tile_and_scales,
    online_softmax_step,
    query_for,
    scale_args,
)
from martlet.layers.kv_cache import LayerKV


@dataclass(frozen=True)
class PrefillConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def prefill_config(head_dim: int, dtype: torch.dtype, device: torch.device) -> PrefillConfig:
    if device.type != "cuda":
        return PrefillConfig(16, 16, 1, 1)  # the interpreter: small tiles keep tests fast
    if dtype == torch.float32 or head_dim > 128:
        return PrefillConfig(64, 32, 4, 2)  # twice the bytes per element: half the tile
    # Best geometric mean of 7 candidates over S = 1k..16k on an H200: 335 TFLOP/s, against 298 for
    # (128, 64, 8, 3) (benchmarks/results/kernels-H200-2026-11-21.md). (128, 128, 8, 3) is 1-2%
    # faster from 4k up but 8% slower at 1k.
    return PrefillConfig(128, 32, 4, 3)


# The block-table width changes from step to step: a specialized stride_bt would compile a new
# variant (about a second) the first time it lands in another value class (1, multiple of 16, other).
@triton.jit(do_not_specialize=["stride_bt"])
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, out_ptr, query_start_loc_ptr, seq_lens_ptr,
    block_tables_ptr, tree_mask_ptr, qk_scale, stride_qt, stride_qh, stride_ot, stride_oh, stride_block, stride_head,
    stride_slot, stride_v_slot, stride_v_d, stride_scale_block, stride_scale_head, stride_bt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    QUANT: tl.constexpr, TREE: tl.constexpr,
):
    head = tl.program_id(0)
    # Causal work grows with the query block's index: launch the heaviest blocks first so the
    # short ones fill in the tail.
    m_block = tl.num_programs(1) - 1 - tl.program_id(1)
    seq = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if m_block * BLOCK_M >= q_len:
        return
    ctx_len = tl.load(seq_lens_ptr + seq)
    kv_head = head // GROUP
    block_table = block_tables_ptr + seq * stride_bt

    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    q_mask = (offs_m < q_len)[:, None] & d_mask[None, :]
    q = tl.load(q_ptr + (q_start + offs_m)[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=q_mask, other=0.0)
    q = query_for(q, QUANT)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    q_pos = ctx_len - q_len + offs_m
    first_pos = ctx_len - q_len + m_block * BLOCK_M
    if TREE:  # earlier new tokens are not all visible: the band starts at the first one
        band_start = (ctx_len - q_len) // BLOCK_N * BLOCK_N
        tree_bits = tl.load(tree_mask_ptr + q_start + offs_m, mask=offs_m < q_len, other=-1)
    else:
        band_start = first_pos // BLOCK_N * BLOCK_N
    for start in range(0, band_start, BLOCK_N):
        k, v, k_scale, v_scale = load_tile_and_scales(
            k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, block_table, start + offs_n, None, kv_head,
            stride_block, stride_head, stride_slot, stride_v_slot, stride_v_d, stride_scale_block, stride_scale_head,
            offs_d, d_mask, BLOCK_SIZE, QUANT)
        m_i, l_i, acc = online_softmax_step(q, k, v, k_scale, v_scale, m_i, l_i, acc, qk_scale, None, False, QUANT,
                                            PRECISION)
    # The band: keys from band_start to the block's last query. Its first tile holds first_pos, which
    # every row sees, so no row starts on an all-masked tile. Rows past q_len (padding) see all keys.
    band_end = tl.minimum(ctx_len, first_pos + BLOCK_M)
    for start in range(band_start, band_end, BLOCK_N):
        keys = start + offs_n
        n_mask = keys < ctx_len
        k, v, k_scale, v_scale = load_tile_and_scales(
            k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, block_table, keys, n_mask, kv_head, stride_block,
            stride_head, stride_slot, stride_v_slot, stride_v_d, stride_scale_block, stride_scale_head, offs_d, d_mask,
            BLOCK_SIZE, QUANT)
        causal = (keys[None, :] <= q_pos[:, None]) & n_mask[None, :]
        if TREE:
            node = keys - (ctx_len - q_len)  # the key's index among the new tokens
            bit = tl.minimum(tl.maximum(node, 0), 63).to(tl.int64)
            in_tree = ((tree_bits[:, None] >> bit[None, :]) & 1) != 0
            causal = causal & (in_tree | ((node < 0) | (node >= 64))[None, :])
        m_i, l_i, acc = online_softmax_step(q, k, v, k_scale, v_scale, m_i, l_i, acc, qk_scale, causal, True, QUANT,
                                            PRECISION)

    out = acc / l_i[:, None]
    tl.store(out_ptr + (q_start + offs_m)[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=q_mask)


def prefill_attention(
    q: torch.Tensor, kv: LayerKV, query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
    max_query_len: int, scale: float, out: torch.Tensor | None = None, config: PrefillConfig | None = None,
    tree_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of the packed queries q [T, Hq, D] over their sequences' paged context.

    One sequence per entry of `seq_lens` (and row of `block_tables`); `query_start_loc` [B + 1]
    holds their cu_seqlens into q. `max_query_len` (a host int, at least the longest) sizes the grid.
    `tree_mask` [T] int64: which new tokens each one sees (see the module's docstring).
    """
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads, block_size = kv.k.shape[1], kv.k.shape[2]
    check_cache(kv, num_q_heads)
    if out is None:
        out = torch.empty_like(q)
    num_seqs = seq_lens.shape[0]
    if num_seqs == 0 or max_query_len == 0:
        return out
    cfg = config or prefill_config(head_dim, q.dtype, q.device)
    grid = (num_q_heads, triton.cdiv(max_query_len, cfg.block_m), num_seqs)
    k_scale, v_scale, stride_scale_block, stride_scale_head = scale_args(kv)
    _prefill_kernel[grid](
        q, kv.k, kv.v, k_scale, v_scale, out, query_start_loc, seq_lens, block_tables,
        query_start_loc if tree_mask is None else tree_mask,  # read only with TREE
        scale * LOG2E, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        *cache_strides(kv), stride_scale_block, stride_scale_head, block_tables.stride(0),
        GROUP=num_q_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=triton.next_power_of_2(head_dim),
        PRECISION=dot_precision(q.dtype), QUANT=kv.k_scale is not None, TREE=tree_mask is not None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out
