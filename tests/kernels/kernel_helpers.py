"""Shared by the kernel tests: device, dtypes, tolerances, a random paged batch and its reference."""

import pytest
import torch

from martlet.layers.attention import AttentionMetadata, paged_attention_reference

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


def make_paged_batch(
    q_lens: list[int], seq_lens: list[int], num_q_heads: int, num_kv_heads: int, head_dim: int,
    block_size: int, dtype: torch.dtype, seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    """Random queries and a random paged cache holding every sequence's whole context.

    Blocks are handed out in shuffled order from a pool with spare blocks, so block tables are
    scattered as they are after some churn. Returns (q [T, Hq, D], k_cache, v_cache, meta).
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
    shape = (num_blocks, num_kv_heads, block_size, head_dim)
    k_cache, v_cache = (torch.randn(shape, generator=gen).to(dtype) for _ in range(2))
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
    return q.to(DEVICE), k_cache.to(DEVICE), v_cache.to(DEVICE), meta


def reference_attention(q, k_cache, v_cache, meta, scale):
    """paged_attention_reference in float32 on the same (possibly 16-bit) inputs."""
    return paged_attention_reference(q.float(), k_cache.float(), v_cache.float(), meta, scale)
