"""Fused rotary + KV-cache write against apply_rotary and write_kv_cache."""

import pytest
import torch
from kernel_helpers import DEVICE, ON_GPU, assert_close, dtypes

from martlet.kernels.rotary_kv import rotary_kv_write
from martlet.layers.attention import write_kv_cache
from martlet.layers.kv_cache import LayerKV, allocate_kv_cache, kv_format
from martlet.layers.rotary import RotaryEmbedding

gpu = pytest.mark.gpu

# (num_tokens, Hq, Hkv, head_dim, block_size, llama3 scaling). A program takes one KV head of a token,
# or all of them from 4 tokens an SM on (the interpreter counts 4 SMs: the second case).
CASES = [
    (7, 4, 4, 64, 16, False),
    (19, 8, 2, 80, 8, True),
    (5, 4, 1, 128, 32, False),
    (6, 12, 6, 64, 16, False),
    (8, 10, 5, 64, 16, True),
    pytest.param(300, 32, 8, 128, 16, True, marks=gpu),
    pytest.param(77, 16, 2, 256, 16, False, marks=gpu),
]
LLAMA3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


@pytest.mark.parametrize("dtype", dtypes())
@pytest.mark.parametrize("num_tokens, num_q_heads, num_kv_heads, head_dim, block_size, scaled", CASES)
def test_rotary_kv_write_matches_reference(num_tokens, num_q_heads, num_kv_heads, head_dim, block_size, scaled,
                                           dtype):
    gen = torch.Generator().manual_seed(0)
    rotary = RotaryEmbedding(head_dim, 4096, 500000.0, LLAMA3 if scaled else None).to(DEVICE)
    # q, k, v as the model hands them over: strided views of one merged projection.
    qkv = torch.randn(num_tokens, (num_q_heads + 2 * num_kv_heads) * head_dim, generator=gen).to(dtype).to(DEVICE)
    q, k, v = qkv.split([num_q_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    q, k, v = (x.view(num_tokens, -1, head_dim) for x in (q, k, v))
    positions = torch.randint(0, 4096, (num_tokens,), generator=gen).to(DEVICE)
    num_blocks = num_tokens // block_size + 3
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens].to(DEVICE)
    slots[num_tokens // 2] = -1  # a padding token: rotated, not stored
    shape = (num_blocks, num_kv_heads, block_size, head_dim)
    k_cache, v_cache = (torch.full(shape, float("nan"), dtype=dtype, device=DEVICE) for _ in range(2))
    q_out = torch.full_like(q, float("nan"))

    rotary_kv_write(q, k, v, positions, rotary.cos_sin_cache, LayerKV(k_cache, v_cache), slots, q_out=q_out)

    q_ref, k_ref = rotary(positions, q.float(), k.float())
    assert_close(q_out, q_ref, dtype)
    real = slots >= 0
    ref_k, ref_v = (torch.full(shape, float("nan"), device=DEVICE) for _ in range(2))
    write_kv_cache(k_ref[real], v[real].float(), LayerKV(ref_k, ref_v), slots[real])
    # The same slots hold values, and every other one is still poison.
    assert torch.equal(k_cache.isnan(), ref_k.isnan()) and torch.equal(v_cache.isnan(), ref_v.isnan())
    written = ~ref_k.isnan()
    assert_close(k_cache[written], ref_k[written], dtype)
    assert_close(v_cache[written], ref_v[written], dtype)


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", dtypes())
@pytest.mark.parametrize("num_tokens, num_q_heads, num_kv_heads, head_dim, block_size, scaled", CASES)
def test_quantized_write_matches_reference(num_tokens, num_q_heads, num_kv_heads, head_dim, block_size, scaled,
                                           dtype, kv_cache_dtype):
    """The kernel's codes and scales are the reference's (`kv_cache.quantize` of the rotated k and of
    v), and bytes of slots nobody wrote (the pool's poison) are untouched."""
    gen = torch.Generator().manual_seed(0)
    rotary = RotaryEmbedding(head_dim, 4096, 500000.0, LLAMA3 if scaled else None).to(DEVICE)
    q = torch.randn(num_tokens, num_q_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    k, v = (torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(dtype).to(DEVICE) for _ in range(2))
    k[0, 0] = 0.0  # an all-zero row: scale 0, codes 0
    positions = torch.randint(0, 4096, (num_tokens,), generator=gen).to(DEVICE)
    num_blocks = num_tokens // block_size + 3
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens].to(DEVICE)
    slots[num_tokens // 2] = -1
    fmt = kv_format(kv_cache_dtype)
    pools = [allocate_kv_cache(1, num_blocks, num_kv_heads, block_size, head_dim, dtype, fmt, DEVICE) for _ in "ab"]
    for pool, _ in pools:
        pool.fill_(0x5A)
    (_, (kv,)), (_, (ref_kv,)) = pools

    rotary_kv_write(q, k, v, positions, rotary.cos_sin_cache, kv, slots)
    _, k_rot = rotary(positions, q, k)
    real = slots >= 0
    write_kv_cache(k_rot[real], v[real], ref_kv, slots[real])

    if not ON_GPU:  # the interpreter does the reference's fp32 operations exactly (up to the sign of 0)
        pairs = (kv.k, ref_kv.k), (kv.v, ref_kv.v), (kv.k_scale, ref_kv.k_scale), (kv.v_scale, ref_kv.v_scale)
        for ours, ref in pairs:
            assert torch.equal(ours.float(), ref.float())
        return
    # On the GPU, fused multiply-adds and fast division may move a scale by an fp16 ulp and a code by a step.
    for ours, ref in ((kv.k_scale, ref_kv.k_scale), (kv.v_scale, ref_kv.v_scale)):
        assert torch.allclose(ours.float(), ref.float(), rtol=2e-3, atol=0)
    for ours, ref in ((kv.k, ref_kv.k), (kv.v, ref_kv.v)):
        step = 1.0 if fmt.dtype == torch.int8 else ref.float().abs() / 8 + 2**-9
        assert ((ours.float() - ref.float()).abs() <= step).all()
