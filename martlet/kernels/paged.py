"""What the prefill and decode kernels share: loading a paged K/V tile, and one online-softmax step.

Softmax runs in the log2 domain: the logits are scaled by `scale * log2(e)` once, so every
exponential is an `exp2` and the log-sum-exp the decode kernel hands its merge is a log2 too.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from martlet.kernels.quantize import widen
from martlet.layers.kv_cache import LayerKV

LOG2E = 1.4426950408889634


@triton.jit
def load_pages(block_table, keys, n_mask, BLOCK_SIZE: tl.constexpr):
    """The cache block of each of a sequence's keys, through its block table (`block_table` points at
    the sequence's row); block 0 where `n_mask` is off (None: every key is in range)."""
    if n_mask is None:
        pages = tl.load(block_table + keys // BLOCK_SIZE)
    else:
        pages = tl.load(block_table + keys // BLOCK_SIZE, mask=n_mask, other=0)
    return pages.to(tl.int64)


@triton.jit
def load_kv_tile(
    k_ptr, v_ptr, block_table, keys, n_mask, kv_head, stride_block, stride_head, stride_slot, stride_v_slot,
    stride_v_d, offs_d, d_mask, BLOCK_SIZE: tl.constexpr, QUANT: tl.constexpr,
):
    """The K and V tiles [N, D] of one sequence's keys `keys` for one KV head: values, or an 8-bit
    cache's codes (scales: `load_scales`). With `n_mask` (None: every key is in range), keys outside
    it read as zeros, except an 8-bit V tile's codes, read from block 0 unmasked: finite codes (the
    pool starts zeroed and stores clamp), which their zero scale cancels. Unmasked, the runs of keys
    that share a block are contiguous bytes of a channel-major V tile, so they load as vectors.
    The tile starts at a multiple of its N keys.
    """
    pages = load_pages(block_table, keys, n_mask, BLOCK_SIZE)
    kv_mask = d_mask[None, :] if n_mask is None else n_mask[:, None] & d_mask[None, :]
    in_page = keys % BLOCK_SIZE
    tile = pages * stride_block + kv_head * stride_head
    k_offs = (tile + in_page * stride_slot)[:, None] + offs_d[None, :]
    k = tl.load(k_ptr + k_offs, mask=kv_mask, other=0.0)
    if QUANT:  # runs of min(N, BLOCK_SIZE) keys share a block, starting at multiples of it
        v_offs = (tile + in_page * stride_v_slot)[:, None] + offs_d[None, :] * stride_v_d
        RUN: tl.constexpr = BLOCK_SIZE if BLOCK_SIZE < keys.shape[0] else keys.shape[0]
        v_offs = tl.max_contiguous(tl.multiple_of(v_offs, [RUN, 1]), [RUN, 1])
        v = tl.load(v_ptr + v_offs, mask=d_mask[None, :], other=0.0)
    else:  # a 16-bit cache's V is laid out as its K (`cache_strides`): K's offsets, no address arithmetic of its own
        v = tl.load(v_ptr + k_offs, mask=kv_mask, other=0.0)
    return k, v


@triton.jit
def load_scales(k_scale_ptr, v_scale_ptr, pages, keys, n_mask, kv_head, stride_scale_block, stride_scale_head,
                BLOCK_SIZE: tl.constexpr, QUANT: tl.constexpr):
    """An 8-bit tile's K and V scales [N] (fp32; 0 for keys outside `n_mask`) given the keys' blocks;
    1 and 1, never read, without QUANT."""
    k_scale = 1.0
    v_scale = 1.0
    if QUANT:
        offs = pages * stride_scale_block + kv_head * stride_scale_head + keys % BLOCK_SIZE
        if n_mask is None:
            k_scale = tl.load(k_scale_ptr + offs).to(tl.float32)
            v_scale = tl.load(v_scale_ptr + offs).to(tl.float32)
        else:
            k_scale = tl.load(k_scale_ptr + offs, mask=n_mask, other=0.0).to(tl.float32)
            v_scale = tl.load(v_scale_ptr + offs, mask=n_mask, other=0.0).to(tl.float32)
    return k_scale, v_scale


@triton.jit
def load_tile_and_scales(
    k_ptr, v_ptr, k_scale_ptr, v_scale_ptr, block_table, keys, n_mask, kv_head, stride_block, stride_head,
    stride_slot, stride_v_slot, stride_v_d, stride_scale_block, stride_scale_head, offs_d, d_mask,
    BLOCK_SIZE: tl.constexpr, QUANT: tl.constexpr,
):
    """`load_kv_tile` and `load_scales` of the same keys, for a loop that does not load scales ahead."""
    k, v = load_kv_tile(k_ptr, v_ptr, block_table, keys, n_mask, kv_head, stride_block, stride_head, stride_slot,
                        stride_v_slot, stride_v_d, offs_d, d_mask, BLOCK_SIZE, QUANT)
    k_scale, v_scale = load_scales(k_scale_ptr, v_scale_ptr, load_pages(block_table, keys, n_mask, BLOCK_SIZE), keys,
                                   n_mask, kv_head, stride_scale_block, stride_scale_head, BLOCK_SIZE, QUANT)
    return k, v, k_scale, v_scale


@triton.jit
def online_softmax_step(
    q, k, v, k_scale, v_scale, m_i, l_i, acc, qk_scale, mask,
    USE_MASK: tl.constexpr, QUANT: tl.constexpr, PRECISION: tl.constexpr,
):
    """Fold one key tile into the running max `m_i`, denominator `l_i` and unnormalized output `acc`.

    q [M, D], k and v [N, D]; `mask` [M, N] says which logits count (ignored unless USE_MASK).
    A row must see at least one key in the first tile it is given, or its max stays -inf.
    An 8-bit tile (QUANT) is widened to q's dtype, fp16 or fp32 (see `query_for`; exactly: every
    int8 and e4m3 code is an fp16), and its per-key scales [N] go on the logits (K) and on the
    probabilities (V), not on the tile.
    """
    if QUANT:
        k = widen(k, q.dtype)
        v = widen(v, q.dtype)
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    if QUANT:
        qk = qk * (k_scale * qk_scale)[None, :]
    else:
        qk = qk * qk_scale
    if USE_MASK:
        qk = tl.where(mask, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    p = tl.math.exp2(qk - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    if QUANT:
        p = p * v_scale[None, :]
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def query_for(q, QUANT: tl.constexpr):
    """The query as the dot products take it: over an 8-bit cache a bf16 query turns fp16, so that
    int8 codes widen to fp16 with `widen`'s few instructions rather than a conversion each."""
    if QUANT and q.dtype == tl.bfloat16:
        q = q.to(tl.float16)
    return q


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 products (tf32 would cost ~3e-4 relative error); 16-bit ignore it."""
    return "ieee" if dtype == torch.float32 else "tf32"


def check_cache(kv: LayerKV, num_q_heads: int | None = None) -> None:
    """The cache layout the kernels assume, and (given the query heads) a whole GQA group per KV head."""
    if kv.k.shape != kv.v.shape or kv.k.stride()[:2] != kv.v.stride()[:2]:
        raise ValueError("the K and V caches must have the same shape and block and head strides")
    if kv.k.stride(-1) != 1 or 1 not in kv.v.stride()[2:]:
        raise ValueError("K's head_dim must be contiguous, and V's head_dim or its slots")
    if kv.k_scale is not None and (kv.k_scale.stride() != kv.v_scale.stride() or kv.k_scale.stride(-1) != 1):
        raise ValueError("the K and V scales must have the same strides, one slot after another")
    num_kv_heads = kv.k.shape[1]
    if num_q_heads is not None and num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} query heads do not split into {num_kv_heads} KV head groups")


def cache_strides(kv: LayerKV) -> tuple:
    """The kernels' cache strides: block, head and slot (K's and V's), and V's channel stride. V shares
    K's block and head strides, and in a 16-bit cache all of K's (the kernels then reuse K's offsets)."""
    if kv.v.stride()[:2] != kv.k.stride()[:2] or (kv.k_scale is None and kv.v.stride() != kv.k.stride()):
        raise ValueError(f"V's strides {kv.v.stride()} do not fit K's {kv.k.stride()}")
    return kv.k.stride(0), kv.k.stride(1), kv.k.stride(2), kv.v.stride(2), kv.v.stride(3)


def scale_args(kv: LayerKV) -> tuple:
    """The kernels' scale arguments: the K and V scales and their block and head strides. An
    unquantized cache (QUANT false) passes the K cache and zeros, which its kernels never read."""
    if kv.k_scale is None:
        return kv.k, kv.k, 0, 0
    return kv.k_scale, kv.v_scale, kv.k_scale.stride(0), kv.k_scale.stride(1)
