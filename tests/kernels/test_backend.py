"""TritonAttentionBackend against TorchAttentionBackend on a mixed step: prefills, chunks and decodes."""

import pytest
import torch
from kernel_helpers import DEVICE, assert_close, dtypes, make_paged_batch

from martlet.layers.attention import Attention, TorchAttentionBackend, get_attention_backend
from martlet.layers.rotary import RotaryEmbedding

# (q_lens, seq_lens, Hq, Hkv, head_dim, block_size): prefills (q_len > 1) first, then decodes.
CASES = [
    ([20, 9, 1, 1, 1], [20, 40, 17, 1, 64], 4, 2, 64, 16),
    ([1, 1], [5, 33], 4, 1, 80, 8),  # decodes only
    ([13], [30], 2, 2, 128, 16),  # one prefill chunk only
    pytest.param([700, 64, 1, 1, 1, 1], [700, 2000, 1, 5000, 17, 300], 32, 8, 128, 16, marks=pytest.mark.gpu),
]


def _layer(backend, num_q_heads, num_kv_heads, head_dim, k_cache, v_cache):
    rotary = RotaryEmbedding(head_dim, 8192, 10000.0, None).to(DEVICE)
    layer = Attention(num_q_heads, num_kv_heads, head_dim, rotary, backend)
    layer.k_cache, layer.v_cache = k_cache, v_cache
    return layer


@pytest.mark.parametrize("dtype", dtypes())
@pytest.mark.parametrize("q_lens, seq_lens, num_q_heads, num_kv_heads, head_dim, block_size", CASES)
def test_backend_matches_torch(q_lens, seq_lens, num_q_heads, num_kv_heads, head_dim, block_size, dtype):
    q, k_cache, v_cache, meta = make_paged_batch(
        q_lens, seq_lens, num_q_heads, num_kv_heads, head_dim, block_size, dtype
    )
    gen = torch.Generator().manual_seed(1)
    k, v = (torch.randn(q.shape[0], num_kv_heads, head_dim, generator=gen).to(dtype).to(DEVICE) for _ in range(2))
    positions = torch.cat([torch.arange(s - n, s) for n, s in zip(q_lens, seq_lens)]).to(DEVICE)

    triton_layer = _layer(get_attention_backend("triton"), num_q_heads, num_kv_heads, head_dim,
                          k_cache.clone(), v_cache.clone())
    out = triton_layer(q, k, v, positions, meta)
    # The reference in float32 on the same inputs.
    torch_layer = _layer(TorchAttentionBackend(), num_q_heads, num_kv_heads, head_dim,
                         k_cache.float(), v_cache.float())
    ref = torch_layer(q.float(), k.float(), v.float(), positions, meta)
    assert_close(out, ref, dtype)
    assert_close(triton_layer.k_cache, torch_layer.k_cache, dtype)
    assert_close(triton_layer.v_cache, torch_layer.v_cache, dtype)
