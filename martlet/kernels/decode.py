"""Decode attention (one new token per sequence) over the paged cache: flash decoding.

Reference: `martlet.layers.attention.paged_attention_reference` with every q_len 1.

Decode reads the whole context to produce one row per head: it is bound by the bytes of K and V.
A program per (sequence, KV head) would leave most of the GPU idle at small batch, so the context
is cut into `num_splits` partitions, each its own program; each writes its normalized partial
output and log-sum-exp, and a second kernel merges them. One program serves all the query heads
that share a KV head (GQA), so each K/V tile is read once, not once per query head.

The grid depends only on host ints that a CUDA graph can fix (KV heads, batch, splits); each
sequence's partition length is worked out in the kernel from its actual length. KV heads vary
fastest, so the GPU starts programs sequence by sequence: with decodes ordered longest context first
(as the scheduler orders them), the longest programs start first instead of some of them last.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from martlet.device import num_sms
from martlet.kernels.paged import (
    LOG2E,
    cache_strides,
    check_cache,
    dot_precision,
    load_kv_tile,
    load_pages,
    load_scales,
    online_softmax_step,
    query_for,
    scale_args,
)
from martlet.kernels.pdl import pdl_launch, wait_for_previous_kernel
from martlet.layers.kv_cache import LayerKV

PROGRAMS_PER_SM = 4  # best of 2, 4, 8, 16 on an H200: enough programs to keep loads in flight on every SM
# Shorter splits give a lone sequence more programs: at batch 1, 128 against 256 made 8 in 256 out
# +1.0% (H100) and +2.3% (H200), 1024 in 1024 out +0.9% and level (benchmarks/results/seed-rows-H100-2026-11-21.md).
MIN_KEYS_PER_SPLIT = 128
MAX_SPLITS = 64


@dataclass(frozen=True)
class DecodeConfig:
    block_n: int
    num_warps: int
    num_stages: int


# Best geometric mean of 8 candidates on an H200 (benchmarks/results/kernels-H200-2026-11-21.md);
# small tiles, deep pipeline: more programs resident per SM, more loads in flight.
HALF_CONFIG = DecodeConfig(32, 2, 4)
# Over an 8-bit cache, the best of 10 candidates on an H200 for both int8 and fp8 (geometric mean of
# four shapes +16%, each large shape +3 to +10%; one run: benchmarks/results/kv-cache-H200-2026-12-02.md).
EIGHT_BIT_CONFIG = DecodeConfig(128, 4, 3)


def decode_config(head_dim: int, dtype: torch.dtype, device: torch.device, quantized: bool = False) -> DecodeConfig:
    if device.type != "cuda":
        return DecodeConfig(16, 1, 1)
    if dtype == torch.float32 or head_dim > 128:
        return DecodeConfig(32, 4, 2)
    return EIGHT_BIT_CONFIG if quantized else HALF_CONFIG


def decode_num_splits(
    num_seqs: int, num_kv_heads: int, max_seq_len: int, device: torch.device, programs_per_sm: int = PROGRAMS_PER_SM
) -> int:
    """Splits per (sequence, KV head): `programs_per_sm` programs for every SM, but none shorter than
    MIN_KEYS_PER_SPLIT keys.

    `max_seq_len` is rounded up to a power of two, so the count only moves when the longest context
    crosses one; a CUDA graph captured for a fixed maximum keeps one split count for all replays.
    """
    wanted = triton.cdiv(programs_per_sm * num_sms(device), max(num_seqs * num_kv_heads, 1))
    longest = triton.next_power_of_2(max(max_seq_len, 1))
    return max(1, min(wanted, triton.cdiv(longest, MIN_KEYS_PER_SPLIT), MAX_SPLITS))


# Triton compiles a variant per value class of each int argument (1, multiple of 16, other) and per
# pointer alignment. The block-table width and the split count change from step to step, and with
# them these strides; in a mixed step the decodes' seq_lens and block_tables start after the
# prefills', at any alignment. Left specialized, each would compile a new variant (a fraction of a
# second) in the middle of serving.
@triton.jit(do_not_specialize=["seq_lens_ptr", "block_tables_ptr", "stride_ot", "stride_oh", "stride_lt",
                               "stride_lh", "stride_bt"])
def _decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, out_ptr, lse_ptr, seq_lens_ptr, block_tables_ptr,
    qk_scale, stride_qt, stride_qh, stride_ot, stride_oh, stride_os, stride_lt, stride_lh,
    stride_block, stride_head, stride_slot, stride_v_slot, stride_v_d, stride_scale_block, stride_scale_head,
    stride_bt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    SPLIT: tl.constexpr, QUANT: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_previous_kernel(PDL)
    kv_head = tl.program_id(0)
    seq = tl.program_id(1)
    split = tl.program_id(2)
    ctx_len = tl.load(seq_lens_ptr + seq)
    # Whole tiles per split, so only a sequence's last tile is partial.
    chunk = tl.cdiv(tl.cdiv(ctx_len, tl.num_programs(2)), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, ctx_len)
    block_table = block_tables_ptr + seq * stride_bt

    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    heads = kv_head * GROUP + offs_g
    q_mask = (offs_g < GROUP)[:, None] & d_mask[None, :]
    q = tl.load(q_ptr + seq * stride_qt + heads[:, None] * stride_qh + offs_d[None, :], mask=q_mask, other=0.0)
    q = query_for(q, QUANT)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    # K and V stream through asynchronous copies that the compiler pipelines. An 8-bit tile's scales
    # (2 bytes a key) are too small for those copies, and loaded in the loop they made every tile wait
    # a memory round trip; so they come into registers a tile ahead, from blocks looked up two ahead.
    k_scale_next, v_scale_next = 1.0, 1.0  # without QUANT: never read
    if QUANT:
        first, ahead = start + offs_n, start + BLOCK_N + offs_n
        k_scale_next, v_scale_next = load_scales(
            k_scale_ptr, v_scale_ptr, load_pages(block_table, first, first < end, BLOCK_SIZE), first, first < end,
            kv_head, stride_scale_block, stride_scale_head, BLOCK_SIZE, QUANT)
        pages_ahead = load_pages(block_table, ahead, ahead < end, BLOCK_SIZE)
    for tile in range(start, end, BLOCK_N):
        keys = tile + offs_n
        n_mask = keys < end
        k, v = load_kv_tile(k_cache_ptr, v_cache_ptr, block_table, keys, n_mask, kv_head, stride_block, stride_head,
                            stride_slot, stride_v_slot, stride_v_d, offs_d, d_mask, BLOCK_SIZE, QUANT)
        k_scale, v_scale = k_scale_next, v_scale_next
        if QUANT:
            k_scale_next, v_scale_next = load_scales(k_scale_ptr, v_scale_ptr, pages_ahead, keys + BLOCK_N,
                                                     keys + BLOCK_N < end, kv_head, stride_scale_block,
                                                     stride_scale_head, BLOCK_SIZE, QUANT)
            pages_ahead = load_pages(block_table, keys + 2 * BLOCK_N, keys + 2 * BLOCK_N < end, BLOCK_SIZE)
        m_i, l_i, acc = online_softmax_step(q, k, v, k_scale, v_scale, m_i, l_i, acc, qk_scale, n_mask[None, :], True,
                                            QUANT, PRECISION)

    # An empty split (context shorter than the split count needs) contributes zeros with weight 0.
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    out_ptrs = out_ptr + seq * stride_ot + heads[:, None] * stride_oh + split * stride_os + offs_d[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=q_mask)
    if SPLIT:
        lse = m_i + tl.math.log2(tl.where(l_i > 0, l_i, 1.0))  # -inf for an empty split
        tl.store(lse_ptr + seq * stride_lt + heads * stride_lh + split, lse, mask=offs_g < GROUP)


@triton.jit(do_not_specialize=["stride_pt", "stride_ph", "stride_lt", "stride_lh", "num_splits"])
def _merge_kernel(
    partial_ptr, lse_ptr, out_ptr, stride_pt, stride_ph, stride_ps, stride_lt, stride_lh, stride_ot, stride_oh,
    num_splits, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_previous_kernel(PDL)
    seq = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_splits
    lse = tl.load(lse_ptr + seq * stride_lt + head * stride_lh + offs_s, mask=s_mask, other=float("-inf"))
    # Only a padding sequence (length 0) has every split empty: keep it finite, its output is zeros.
    lse_max = tl.max(lse, 0)
    weight = tl.math.exp2(lse - tl.where(lse_max == float("-inf"), 0.0, lse_max))
    mask = s_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
    parts = tl.load(partial_ptr + seq * stride_pt + head * stride_ph + offs_s[:, None] * stride_ps + offs_d[None, :],
                    mask=mask, other=0.0)
    total = tl.sum(weight, 0)
    out = tl.sum(parts * weight[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + seq * stride_ot + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


def decode_attention(
    q: torch.Tensor, kv: LayerKV, seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float,
    num_splits: int, out: torch.Tensor | None = None, config: DecodeConfig | None = None,
) -> torch.Tensor:
    """Attention of one query per sequence, q [B, Hq, D], over its `seq_lens[b]` cached keys.

    `num_splits` comes from `decode_num_splits` (or a test); any value gives the same result.
    """
    num_seqs, num_q_heads, head_dim = q.shape
    num_kv_heads, block_size = kv.k.shape[1], kv.k.shape[2]
    check_cache(kv, num_q_heads)
    if out is None:
        out = torch.empty_like(q)
    if num_seqs == 0:
        return out
    cfg = config or decode_config(head_dim, q.dtype, q.device, kv.k_scale is not None)
    group = num_q_heads // num_kv_heads
    split = num_splits > 1
    if split:
        partial = torch.empty(num_seqs, num_q_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        lse = torch.empty(num_seqs, num_q_heads, num_splits, dtype=torch.float32, device=q.device)
        target, stride_os, lse_strides = partial, partial.stride(2), (lse.stride(0), lse.stride(1))
    else:  # one split: write the final output directly, no merge
        target, stride_os, lse, lse_strides = out, 0, None, (0, 0)
    block_d = triton.next_power_of_2(head_dim)
    k_scale, v_scale, stride_scale_block, stride_scale_head = scale_args(kv)
    pdl = pdl_launch(q.device)
    _decode_kernel[(num_kv_heads, num_seqs, num_splits)](
        q, kv.k, kv.v, k_scale, v_scale, target, lse, seq_lens, block_tables, scale * LOG2E,
        q.stride(0), q.stride(1), target.stride(0), target.stride(1), stride_os, *lse_strides,
        *cache_strides(kv), stride_scale_block, stride_scale_head, block_tables.stride(0),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        # tl.dot needs at least 16 rows: small groups are padded with masked heads.
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=cfg.block_n, BLOCK_D=block_d,
        PRECISION=dot_precision(q.dtype), SPLIT=split, QUANT=kv.k_scale is not None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl,
    )
    if split:
        _merge_kernel[(num_seqs, num_q_heads)](
            partial, lse, out, partial.stride(0), partial.stride(1), partial.stride(2),
            lse.stride(0), lse.stride(1), out.stride(0), out.stride(1),
            num_splits, HEAD_DIM=head_dim, BLOCK_S=triton.next_power_of_2(num_splits),
            BLOCK_D=block_d, num_warps=4, **pdl,
        )
    return out
