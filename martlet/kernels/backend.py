"""The Triton attention backend: fused rotary + cache write, then prefill and decode attention."""

from __future__ import annotations

import torch

from martlet.kernels.decode import decode_attention, decode_num_splits
from martlet.kernels.prefill import prefill_attention
from martlet.kernels.rotary_kv import rotary_kv_write
from martlet.layers.attention import Attention, AttentionBackend, AttentionMetadata


class TritonAttentionBackend(AttentionBackend):
    """Launch grids come from the host ints in `meta`: no device-to-host sync in forward.

    The decode launch depends only on `num_decodes`, the model's head counts and `meta.max_seq_len`
    through the split count, which moves only at powers of two of max_seq_len: that count is the
    `decode_launch_key` a CUDA graph is captured under.
    """

    name = "triton"

    def decode_launch_key(self, num_decodes: int, num_kv_heads: int, max_seq_len: int) -> int:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return decode_num_splits(num_decodes, num_kv_heads, max_seq_len, device)

    def rotate_and_store(
        self, layer: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
        slot_mapping: torch.Tensor, q_out: torch.Tensor | None,
    ) -> torch.Tensor:
        return rotary_kv_write(
            q, k, v, positions, layer.rotary.cos_sin_cache, layer.kv, slot_mapping, q_out
        )

    def attend(
        self, layer: Attention, q: torch.Tensor, meta: AttentionMetadata, out: torch.Tensor | None
    ) -> torch.Tensor:
        out = torch.empty_like(q) if out is None else out
        num_prefill_tokens, num_prefills, num_decodes = meta.num_prefill_tokens, meta.num_prefills, meta.num_decodes
        if num_prefills:
            prefill_attention(
                q[:num_prefill_tokens], layer.kv, meta.query_start_loc[: num_prefills + 1],
                meta.seq_lens[:num_prefills], meta.block_tables[:num_prefills], meta.max_query_len, layer.scale,
                out=out[:num_prefill_tokens],
                tree_mask=None if meta.tree_mask is None else meta.tree_mask[:num_prefill_tokens],
            )
        if num_decodes:
            decodes = slice(num_prefill_tokens, num_prefill_tokens + num_decodes)
            num_splits = decode_num_splits(num_decodes, layer.num_kv_heads, meta.max_seq_len, q.device)
            decode_attention(
                q[decodes], layer.kv, meta.seq_lens[num_prefills:],
                meta.block_tables[num_prefills:], layer.scale, num_splits, out=out[decodes],
            )
        return out
