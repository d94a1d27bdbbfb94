"""Shared by the kernel tests: device, dtypes, tolerances, a random paged batch and its reference."""

import pytest
import torch

from martlet.layers.attention import AttentionMetadata, paged_attention_reference
from martlet.layers.kv_cache import LayerKV, allocate_kv_cache, kv_format, quantize

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
# Relative-error budgets ||out - ref|| / ||ref|| against a float32 reference on the same inputs.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def dtypes():
    """fp32 and fp16 everywhere; bf16 only on the GPU (the interpreter's bf16 is wrong)."""
    return [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert not out.isnan().any(), "an output element was never written (or is NaN)"
    err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    assert err < TOLERANCE[dtype], f"relative error {err:.2e} over {TOLERANCE[dtype]:.0e}"


def assert_codes_close(codes: torch.Tensor, scales: torch.Tensor, ref_codes: torch.Tensor, ref_scales: torch.Tensor,
                       ulps: float = 0.0) -> None:
    """Per-token 8-bit codes and fp32 scales against the reference's: scales within `ulps`-ish relative
    error, codes within one step (a last-bit difference in the input or fast division may move one)."""
    assert codes.dtype == ref_codes.dtype and scales.dtype == torch.float32
    torch.testing.assert_close(scales.cpu(), ref_scales, rtol=max(ulps, 1e-6), atol=0)
    ref = ref_codes.float()
    step = 1.0 if codes.dtype == torch.int8 else ref.abs() / 8 + 2**-9
    assert ((codes.cpu().float() - ref).abs() <= step).all()


def make_paged_batch(
    q_lens: list[int], seq_lens: list[int], num_q_heads: int, num_kv_heads: int, head_dim: int,
    block_size: int, dtype: torch.dtype, seed: int = 0, kv_cache_dtype: str = "auto",
) -> tuple[torch.Tensor, LayerKV, AttentionMetadata]:
    """Random queries and a random paged cache holding every sequence's whole context, in the
    engine's pool layout (8-bit codes with their scales for an 8-bit `kv_cache_dtype`).

    Blocks are handed out in shuffled order from a pool with spare blocks, so block tables are
    scattered as they are after some churn. Returns (q [T, Hq, D], the cache, meta).
    """
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3
    perm = torch.randperm(num_blocks, generator=gen).int()
    width = max(blocks_per_seq)
    block_tables = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    used = 0
    for i, n in enumerate(blocks_per_seq):
        block_tables[i, :n] = perm[used : used + n]
        used += n
    fmt = kv_format(kv_cache_dtype)
    _, (kv,) = allocate_kv_cache(1, num_blocks, num_kv_heads, block_size, head_dim, dtype, fmt, DEVICE)
    for codes, scales in ((kv.k, kv.k_scale), (kv.v, kv.v_scale)):
        rows = torch.randn(codes.shape, generator=gen)
        if fmt is None:
            codes.copy_(rows.to(dtype))
        else:
            codes_q, scales_q = quantize(rows, fmt)
            codes.copy_(codes_q)
            scales.copy_(scales_q)
    q = torch.randn(sum(q_lens), num_q_heads, head_dim, generator=gen).to(dtype)
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    slots = []
    for i, (q_len, seq_len) in enumerate(zip(q_lens, seq_lens)):
        for pos in range(seq_len - q_len, seq_len):
            slots.append(int(block_tables[i, pos // block_size]) * block_size + pos % block_size)
    num_prefills = sum(n > 1 for n in q_lens)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=DEVICE),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        block_tables=block_tables.to(DEVICE),
        num_prefills=num_prefills,
        num_prefill_tokens=sum(q_lens[:num_prefills]),
        num_decodes=len(q_lens) - num_prefills,
        max_query_len=max(q_lens),
        max_seq_len=max(seq_lens),
        query_start_loc_cpu=starts,
        seq_lens_cpu=list(seq_lens),
    )
    return q.to(DEVICE), kv, meta


def float_cache(kv: LayerKV) -> LayerKV:
    """The same cache in float32: an unquantized one widened; an 8-bit one as it is (the reference
    dequantizes it in float32 anyway)."""
    return kv if kv.k_scale is not None else LayerKV(kv.k.float(), kv.v.float())


def reference_attention(q, kv, meta, scale):
    """paged_attention_reference in float32 on the same (possibly 16-bit or 8-bit) inputs."""
    return paged_attention_reference(q.float(), float_cache(kv), meta, scale)
