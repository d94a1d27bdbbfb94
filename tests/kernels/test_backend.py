"""TritonAttentionBackend against TorchAttentionBackend on a mixed step: prefills, chunks and decodes."""

import pytest
import torch
from kernel_helpers import DEVICE, assert_close, dtypes, float_cache, make_paged_batch

from martlet.config import KV_CACHE_DTYPES
from martlet.layers.attention import Attention, TorchAttentionBackend
from martlet.layers.backends import get_attention_backend
from martlet.layers.kv_cache import LayerKV, dequantize
from martlet.layers.rotary import RotaryEmbedding

# (q_lens, seq_lens, Hq, Hkv, head_dim, block_size): prefills (q_len > 1) first, then decodes.
CASES = [
    ([20, 9, 1, 1, 1], [20, 40, 17, 1, 64], 4, 2, 64, 16),
    ([1, 1], [5, 33], 4, 1, 80, 8),  # decodes only
    ([13], [30], 2, 2, 128, 16),  # one prefill chunk only
    pytest.param([700, 64, 1, 1, 1, 1], [700, 2000, 1, 5000, 17, 300], 32, 8, 128, 16, marks=pytest.mark.gpu),
]


def _layer(backend, num_q_heads, num_kv_heads, head_dim, kv):
    rotary = RotaryEmbedding(head_dim, 8192, 10000.0, None).to(DEVICE)
    layer = Attention(num_q_heads, num_kv_heads, head_dim, rotary, backend)
    layer.kv = kv
    return layer


def _clone(kv: LayerKV) -> LayerKV:
    return LayerKV(*(None if t is None else t.clone() for t in (kv.k, kv.v, kv.k_scale, kv.v_scale)))


@pytest.mark.parametrize("kv_cache_dtype", KV_CACHE_DTYPES)
@pytest.mark.parametrize("dtype", dtypes())
@pytest.mark.parametrize("q_lens, seq_lens, num_q_heads, num_kv_heads, head_dim, block_size", CASES)
def test_backend_matches_torch(q_lens, seq_lens, num_q_heads, num_kv_heads, head_dim, block_size, dtype,
                               kv_cache_dtype):
    q, kv, meta = make_paged_batch(
        q_lens, seq_lens, num_q_heads, num_kv_heads, head_dim, block_size, dtype, kv_cache_dtype=kv_cache_dtype
    )
    gen = torch.Generator().manual_seed(1)
    k, v = (torch.randn(q.shape[0], num_kv_heads, head_dim, generator=gen).to(dtype).to(DEVICE) for _ in range(2))
    positions = torch.cat([torch.arange(s - n, s) for n, s in zip(q_lens, seq_lens)]).to(DEVICE)

    triton_layer = _layer(get_attention_backend("triton"), num_q_heads, num_kv_heads, head_dim, _clone(kv))
    out = triton_layer(q, k, v, positions, meta)
    # The reference in float32 on the same inputs (an 8-bit cache quantizes what it is given: the
    # same 16-bit k and v, widened exactly).
    torch_layer = _layer(TorchAttentionBackend(), num_q_heads, num_kv_heads, head_dim, _clone(float_cache(kv)))
    ref = torch_layer(q.float(), k.float(), v.float(), positions, meta)
    assert_close(out, ref, dtype)
    ours, theirs = triton_layer.kv, torch_layer.kv
    assert_close(dequantize(ours.k, ours.k_scale), dequantize(theirs.k, theirs.k_scale), dtype)
    assert_close(dequantize(ours.v, ours.v_scale), dequantize(theirs.v, theirs.v_scale), dtype)
