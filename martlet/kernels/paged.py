"""What the prefill and decode kernels share: addressing a paged K/V tile, and one online-softmax step.

Softmax runs in the log2 domain: the logits are scaled by `scale * log2(e)` once, so every
exponential is an `exp2` and the log-sum-exp the decode kernel hands its merge is a log2 too.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def paged_offsets(
    block_table, offs_n, n_mask, kv_head, stride_block, stride_head, stride_slot, offs_d,
    BLOCK_SIZE: tl.constexpr,
):
    """Element offsets of keys `offs_n` of one sequence and one KV head into the cache: an [N, D] tile.

    `block_table` points at the sequence's row of the block table; each key finds its page there.
    Keys outside `n_mask` (None: all keys are in range) get garbage offsets: mask their loads too.
    """
    pages = tl.load(block_table + offs_n // BLOCK_SIZE, mask=n_mask).to(tl.int64)
    rows = pages * stride_block + kv_head * stride_head + (offs_n % BLOCK_SIZE) * stride_slot
    return rows[:, None] + offs_d[None, :]


@triton.jit
def load_kv_tile(
    k_cache_ptr, v_cache_ptr, block_table, keys, n_mask, kv_head, stride_block, stride_head, stride_slot,
    offs_d, d_mask, BLOCK_SIZE: tl.constexpr,
):
    """The K and V tiles [N, D] of `keys` (those outside `n_mask` read as zeros)."""
    offs = paged_offsets(block_table, keys, n_mask, kv_head, stride_block, stride_head, stride_slot, offs_d,
                         BLOCK_SIZE)
    kv_mask = n_mask[:, None] & d_mask[None, :]
    return tl.load(k_cache_ptr + offs, mask=kv_mask, other=0.0), tl.load(v_cache_ptr + offs, mask=kv_mask, other=0.0)


@triton.jit
def online_softmax_step(
    q, k, v, m_i, l_i, acc, qk_scale, mask, USE_MASK: tl.constexpr, PRECISION: tl.constexpr,
):
    """Fold one key tile into the running max `m_i`, denominator `l_i` and unnormalized output `acc`.

    q [M, D], k and v [N, D]; `mask` [M, N] says which logits count (ignored unless USE_MASK).
    A row must see at least one key in the first tile it is given, or its max stays -inf.
    """
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if USE_MASK:
        qk = tl.where(mask, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    p = tl.math.exp2(qk - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 products (tf32 would cost ~3e-4 relative error); 16-bit ignore it."""
    return "ieee" if dtype == torch.float32 else "tf32"


def check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, num_q_heads: int | None = None) -> None:
    """The cache layout the kernels assume, and (given the query heads) a whole GQA group per KV head."""
    if k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride():
        raise ValueError("k_cache and v_cache must have the same shape and strides")
    if k_cache.stride(-1) != 1:
        raise ValueError("the KV cache's head_dim must be contiguous")
    num_kv_heads = k_cache.shape[1]
    if num_q_heads is not None and num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} query heads do not split into {num_kv_heads} KV head groups")
