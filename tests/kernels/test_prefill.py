"""Prefill attention against paged_attention_reference: packed prompts, cached prefixes, GQA, head dims,
tree masks (speculative guesses verified as a tree)."""

import dataclasses

import pytest
import torch
from kernel_helpers import DEVICE, assert_close, dtypes, make_paged_batch, reference_attention

from martlet.config import KV_CACHE_DTYPES
from martlet.kernels.prefill import prefill_attention
from martlet.layers.attention import paged_attention_reference, read_context

gpu = pytest.mark.gpu

# (q_lens, seq_lens, Hq, Hkv, head_dim, block_size): seq_len > q_len means a cached prefix.
CASES = [
    ([37], [37], 4, 4, 64, 16),  # one prompt, crosses two block boundaries
    ([16, 33, 7], [16, 33, 7], 4, 2, 80, 16),  # lengths at, past and under a block; non-power-of-2 dim
    ([20, 5, 17], [52, 32, 17], 4, 1, 128, 8),  # prefix hits / later chunks, MQA
    ([9, 31], [41, 64], 8, 2, 64, 32),  # GQA 4, prefix ending mid-block
    pytest.param([512, 1000, 77], [512, 1500, 3000], 32, 8, 128, 16, marks=gpu),
    pytest.param([300, 129], [300, 700], 16, 2, 96, 16, marks=gpu),
    pytest.param([257, 64], [257, 320], 8, 1, 256, 16, marks=gpu),
]


@pytest.mark.parametrize("kv_cache_dtype", KV_CACHE_DTYPES)
@pytest.mark.parametrize("dtype", dtypes())
@pytest.mark.parametrize("q_lens, seq_lens, num_q_heads, num_kv_heads, head_dim, block_size", CASES)
def test_prefill_matches_reference(q_lens, seq_lens, num_q_heads, num_kv_heads, head_dim, block_size, dtype,
                                   kv_cache_dtype):
    q, kv, meta = make_paged_batch(
        q_lens, seq_lens, num_q_heads, num_kv_heads, head_dim, block_size, dtype, kv_cache_dtype=kv_cache_dtype
    )
    scale = head_dim**-0.5
    out = torch.full_like(q, float("nan"))
    prefill_attention(q, kv, meta.query_start_loc, meta.seq_lens, meta.block_tables, meta.max_query_len, scale,
                      out=out)
    assert_close(out, reference_attention(q, kv, meta, scale), dtype)


def test_prefill_writes_only_its_rows():
    """Two prompts packed into a larger buffer: rows outside them stay untouched."""
    q, kv, meta = make_paged_batch([5, 3], [5, 3], 2, 2, 64, 16, torch.float32)
    out = torch.full((10, 2, 64), float("nan"), device=DEVICE)
    prefill_attention(q, kv, meta.query_start_loc, meta.seq_lens, meta.block_tables, meta.max_query_len, 0.125,
                      out=out)
    assert not out[:8].isnan().any() and out[8:].isnan().all()


def random_tree_bits(num_nodes: int, gen: torch.Generator) -> list[int]:
    """Each node's ancestors and itself as bits (an int64: bit 63 is the sign); node i's parent is a
    random earlier node."""
    bits = [1]
    for i in range(1, num_nodes):
        parent = int(torch.randint(i, (), generator=gen))
        bits.append(bits[parent] | 1 << i)
    return [b - (1 << 64) if b >> 63 else b for b in bits]


def tree_batch(q_lens: list[int], seq_lens: list[int], trees: list[bool], dtype: torch.dtype,
               kv_cache_dtype: str = "auto"):
    """A paged batch whose sequences marked in `trees` verify a random tree of q_len nodes; the others
    are causal (mask -1)."""
    q, kv, meta = make_paged_batch(q_lens, seq_lens, 4, 2, 64, 16, dtype, kv_cache_dtype=kv_cache_dtype)
    gen = torch.Generator().manual_seed(1)
    bits = [b for n, tree in zip(q_lens, trees) for b in (random_tree_bits(n, gen) if tree else [-1] * n)]
    return q, kv, dataclasses.replace(meta, tree_mask=torch.tensor(bits, dtype=torch.int64, device=DEVICE))


def test_the_tree_reference_attends_along_each_path():
    """Each node's output is causal attention over the context and its root-to-node path alone."""
    q_lens, seq_lens = [23, 9], [40, 9]
    q, kv, meta = tree_batch(q_lens, seq_lens, [True, True], torch.float32)
    out = paged_attention_reference(q, kv, meta, 0.125)
    for i, (q_len, ctx_len) in enumerate(zip(q_lens, seq_lens)):
        table = meta.block_tables[i, : -(-ctx_len // 16)]
        keys, values = (read_context(c, None, table)[:, :ctx_len].repeat_interleave(2, dim=0) for c in (kv.k, kv.v))
        start = meta.query_start_loc_cpu[i]
        for j in range(q_len):
            bits = int(meta.tree_mask[start + j]) % (1 << 64)
            seen = list(range(ctx_len - q_len)) + [ctx_len - q_len + n for n in range(q_len) if bits >> n & 1]
            probs = torch.softmax(q[start + j][:, None, :] @ keys[:, seen].transpose(1, 2) * 0.125, dim=-1)
            torch.testing.assert_close(out[start + j], (probs @ values[:, seen])[:, 0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
@pytest.mark.parametrize("dtype", dtypes())
def test_prefill_with_a_tree_mask_matches_reference(dtype, kv_cache_dtype):
    """Trees of up to 64 nodes (several query blocks) after a context, next to a causal prompt longer
    than 64 tokens (its mask -1) and one without a cached prefix."""
    q, kv, meta = tree_batch([70, 40, 23, 64], [70, 57, 23, 100], [False, True, True, True], dtype, kv_cache_dtype)
    out = torch.full_like(q, float("nan"))
    prefill_attention(q, kv, meta.query_start_loc, meta.seq_lens, meta.block_tables, meta.max_query_len, 0.125,
                      out=out, tree_mask=meta.tree_mask)
    assert_close(out, reference_attention(q, kv, meta, 0.125), dtype)
