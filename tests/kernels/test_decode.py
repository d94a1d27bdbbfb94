"""Decode attention (split-K) against paged_attention_reference: splits, GQA, head dims, block sizes."""

import pytest
import torch
from kernel_helpers import DEVICE, assert_close, dtypes, make_paged_batch, reference_attention

from martlet.config import KV_CACHE_DTYPES
from martlet.kernels.decode import MAX_SPLITS, decode_attention, decode_num_splits

gpu = pytest.mark.gpu

# (seq_lens, Hq, Hkv, head_dim, block_size, num_splits)
CASES = [
    ([1, 16, 17, 100], 4, 4, 64, 16, 1),  # one split: the kernel writes the output itself
    ([1, 16, 17, 100], 4, 4, 64, 16, 3),  # a 1-token context leaves splits empty
    ([33, 64, 250], 8, 2, 80, 8, 4),
    ([129], 4, 1, 128, 32, 8),  # MQA; splits past the context's end are empty
    ([300, 129], 4, 2, 64, 128, 2),  # blocks of 128: a tile of 128 keys is one block
    pytest.param([1, 511, 4096, 9000, 33], 32, 8, 128, 16, 16, marks=gpu),
    pytest.param([2000, 70], 16, 2, 96, 16, 7, marks=gpu),
    pytest.param([1500, 3], 8, 1, 256, 16, 5, marks=gpu),
]


def _decode(q, kv, meta, num_splits):
    out = torch.full_like(q, float("nan"))
    return decode_attention(q, kv, meta.seq_lens, meta.block_tables, q.shape[-1] ** -0.5, num_splits, out=out)


@pytest.mark.parametrize("kv_cache_dtype", KV_CACHE_DTYPES)
@pytest.mark.parametrize("dtype", dtypes())
@pytest.mark.parametrize("seq_lens, num_q_heads, num_kv_heads, head_dim, block_size, num_splits", CASES)
def test_decode_matches_reference(seq_lens, num_q_heads, num_kv_heads, head_dim, block_size, num_splits, dtype,
                                  kv_cache_dtype):
    q, kv, meta = make_paged_batch(
        [1] * len(seq_lens), seq_lens, num_q_heads, num_kv_heads, head_dim, block_size, dtype,
        kv_cache_dtype=kv_cache_dtype,
    )
    out = _decode(q, kv, meta, num_splits)
    assert_close(out, reference_attention(q, kv, meta, head_dim**-0.5), dtype)


def test_padding_sequence_gives_zeros():
    """A length-0 sequence (a padded slot of a CUDA graph batch) yields finite zeros, split or not."""
    q, kv, meta = make_paged_batch([1, 1], [20, 1], 2, 1, 64, 16, torch.float32)
    meta.seq_lens[1] = 0
    for num_splits in (1, 4):
        out = _decode(q, kv, meta, num_splits)
        assert not out[0].isnan().any() and (out[1] == 0).all()


def test_num_splits_fills_the_gpu_and_stays_bounded():
    cpu = torch.device("cpu")
    assert decode_num_splits(256, 8, 512, cpu) == 1  # plenty of programs already
    assert decode_num_splits(1, 8, 100, cpu) == 1  # too short to split
    assert decode_num_splits(1, 1, 1 << 20, cpu) <= MAX_SPLITS
    # Fewer sequences, more splits; and the count only moves at powers of two of max_seq_len.
    assert decode_num_splits(1, 1, 8192, cpu) >= decode_num_splits(4, 1, 8192, cpu)
    assert decode_num_splits(1, 1, 600, cpu) == decode_num_splits(1, 1, 1024, cpu) > 1
    assert DEVICE.type == "cpu" or decode_num_splits(1, 8, 32768, DEVICE) > 1
