"""Prefill attention against paged_attention_reference: packed prompts, cached prefixes, GQA, head dims."""

import pytest
import torch
from kernel_helpers import DEVICE, assert_close, dtypes, make_paged_batch, reference_attention

from martlet.config import KV_CACHE_DTYPES
from martlet.kernels.prefill import prefill_attention

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
