"""Paged attention: the layer, the per-step metadata, and the backend seam kernels plug into.

The KV cache of one layer is two tensors, K and V, each laid out
`[num_blocks, num_kv_heads, block_size, head_dim]`. One (block, kv head) is then a contiguous
`block_size x head_dim` tile: the unit a decode or prefill program loads, in one coalesced read
(4 KiB for 16 x 128 fp16). Writes scatter one head_dim row per (token, head), which is cheap since
each step writes only the new tokens.

A step's batch is flat: the new tokens of every scheduled sequence, concatenated (no padding),
sequences with several new tokens (prefills, prefill chunks) first, then the single-token ones
(decodes). Each sequence attends causally to its whole context, the part already cached and its
new tokens, through its block table.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace

import torch
from torch import nn

from martlet.layers.kv_cache import LayerKV, dequantize, quantize
from martlet.layers.rotary import RotaryEmbedding


@dataclass
class AttentionMetadata:
    """Describes one step's flat batch to the attention backend.

    Tensors live on the model's device; the `_cpu` lists and plain ints are host copies kept for
    code (the torch backend, kernel launch grids) that needs them without a device sync.
    """

    slot_mapping: torch.Tensor  # [T] int64: cache slot (block * block_size + offset) of each new token
    query_start_loc: torch.Tensor  # [B + 1] int32: cu_seqlens of the new tokens
    seq_lens: torch.Tensor  # [B] int32: context length of each sequence, new tokens included
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    num_prefills: int  # the first num_prefills sequences have more than one new token
    num_prefill_tokens: int
    num_decodes: int  # the rest have exactly one
    max_query_len: int
    max_seq_len: int
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]
    # [T] int64, or None for causal attention: bit i of a new token's entry says it sees its sequence's
    # new token i (a tree of speculative guesses; see martlet/kernels/prefill.py). Prefill tokens only.
    tree_mask: torch.Tensor | None = None


class Attention(nn.Module):
    """Multi-head attention over the paged cache; the backend does the arithmetic.

    The model runner hands every layer its views into the KV pool (`kv`) once the pool exists.
    """

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        rotary: RotaryEmbedding,
        backend: AttentionBackend,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.rotary = rotary
        self.backend = backend
        self.kv = LayerKV(torch.empty(0), torch.empty(0))

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """q [T, Hq, D], k and v [T, Hkv, D], before rotary. Returns [T, Hq, D]."""
        return self.attend(self.rotate_and_store(q, k, v, positions, meta.slot_mapping), meta)

    def rotate_and_store(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
        slot_mapping: torch.Tensor, q_out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Rotary on q and k; k and v into the cache. Returns the rotated q (in q_out if given)."""
        return self.backend.rotate_and_store(self, q, k, v, positions, slot_mapping, q_out)

    def attend(self, q: torch.Tensor, meta: AttentionMetadata, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rotated q [T, Hq, D] over the cached context, new tokens' K/V included (into out if given)."""
        return self.backend.attend(self, q, meta, out)


class AttentionBackend(ABC):
    """What a kernel library provides: rotary on q/k and the cache write, then attention.

    The first lets a GPU backend fuse rotary and the cache write into one kernel; it needs only
    per-token inputs, so it can sit inside a CUDA graph captured for a token count. The second
    picks separate prefill and decode kernels by the step's sequences.
    """

    name: str

    @abstractmethod
    def rotate_and_store(
        self, layer: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
        slot_mapping: torch.Tensor, q_out: torch.Tensor | None,
    ) -> torch.Tensor: ...

    @abstractmethod
    def attend(
        self, layer: Attention, q: torch.Tensor, meta: AttentionMetadata, out: torch.Tensor | None
    ) -> torch.Tensor: ...

    def decode_launch_key(self, num_decodes: int, num_kv_heads: int, max_seq_len: int) -> int:
        """What, besides the batch size, fixes the shape of a decode step's kernel launches.

        A CUDA graph captured for one key replays correctly for any step with the same key.
        """
        return 0


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, kv: LayerKV, slot_mapping: torch.Tensor) -> None:
    """Reference cache write: token t goes to block slot // bs, offset slot % bs, every head; an
    8-bit cache stores codes and scales (`kv_cache.quantize`). A negative slot marks a padding token
    (in a CUDA graph's batch): it is stored nowhere."""
    block_size = kv.k.shape[2]
    stored = slot_mapping >= 0
    slots = slot_mapping[stored]
    blocks, offsets = slots // block_size, slots % block_size
    for x, codes, scales in ((k, kv.k, kv.k_scale), (v, kv.v, kv.v_scale)):
        if scales is None:
            codes[blocks, :, offsets] = x[stored].to(codes.dtype)
        else:
            codes[blocks, :, offsets], scales[blocks, :, offsets] = quantize(x[stored], kv.format)


def read_context(codes: torch.Tensor, scales: torch.Tensor | None, block_tables: torch.Tensor) -> torch.Tensor:
    """The cached rows of whole pages, fp32: block_tables [..., nb] gives [..., Hkv, nb * bs, D]."""
    tables = block_tables.long()
    rows = dequantize(codes[tables], None if scales is None else scales[tables])  # [..., nb, Hkv, bs, D]
    return rows.transpose(-3, -4).flatten(-3, -2)


def paged_attention_reference(q: torch.Tensor, kv: LayerKV, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Attention of every new token over its sequence's cached context, one sequence at a time.

    q is [T, Hq, D] after rotary; the new tokens' K/V must already be in the cache.
    """
    out = torch.empty_like(q)
    group = q.shape[1] // kv.k.shape[1]
    starts, seq_lens = meta.query_start_loc_cpu, meta.seq_lens_cpu
    for i, ctx_len in enumerate(seq_lens):
        start, end = starts[i], starts[i + 1]
        q_len = end - start
        table = meta.block_tables[i, : -(-ctx_len // kv.k.shape[2])]
        keys = read_context(kv.k, kv.k_scale, table)[:, :ctx_len].repeat_interleave(group, dim=0)
        values = read_context(kv.v, kv.v_scale, table)[:, :ctx_len].repeat_interleave(group, dim=0)
        # Query j sits at position ctx_len - q_len + j and sees keys up to and including it.
        q_pos = torch.arange(ctx_len - q_len, ctx_len, device=q.device)
        too_far = torch.arange(ctx_len, device=q.device)[None, :] > q_pos[:, None]
        if meta.tree_mask is not None:  # and of the new keys, only those its bits name
            node = torch.arange(ctx_len, device=q.device) - (ctx_len - q_len)
            bits = meta.tree_mask[start:end, None] >> node.clamp(0, 63)[None, :] & 1
            too_far |= (bits == 0) & (node >= 0) & (node < 64)
        scores = q[start:end].transpose(0, 1).float() @ keys.transpose(1, 2) * scale
        probs = torch.softmax(scores.masked_fill(too_far, float("-inf")), dim=-1)
        out[start:end] = (probs @ values).transpose(0, 1).to(q.dtype)
    return out


def decode_attention_torch(
    q: torch.Tensor, kv: LayerKV, seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float,
) -> torch.Tensor:
    """One query per sequence, q [B, Hq, D], over its whole cached context: all sequences at once,
    their contexts padded to the longest and masked, since a loop per sequence costs more on a CPU."""
    num_seqs, num_q_heads, head_dim = q.shape
    num_kv_heads = kv.k.shape[1]
    keys = read_context(kv.k, kv.k_scale, block_tables)  # [B, Hkv, L, D]
    values = read_context(kv.v, kv.v_scale, block_tables)
    q = q.view(num_seqs, num_kv_heads, num_q_heads // num_kv_heads, head_dim)
    scores = torch.einsum("bhgd,bhld->bhgl", q.float(), keys) * scale
    too_far = torch.arange(keys.shape[2], device=q.device)[None, :] >= seq_lens[:, None]
    scores.masked_fill_(too_far[:, None, None, :], float("-inf"))
    values = values.masked_fill(too_far[:, None, :, None], 0.0)  # 0 * stale NaN would be NaN
    out = torch.einsum("bhgl,bhld->bhgd", torch.softmax(scores, dim=-1), values)
    return out.reshape(num_seqs, num_q_heads, head_dim).to(q.dtype)


class TorchAttentionBackend(AttentionBackend):
    """Plain PyTorch: the reference every kernel is tested against, and the CPU path.

    Prefills go through the per-sequence reference; decodes are batched.
    """

    name = "torch"

    def rotate_and_store(self, layer, q, k, v, positions, slot_mapping, q_out):
        q, k = layer.rotary(positions, q, k)
        write_kv_cache(k, v, layer.kv, slot_mapping)
        return q if q_out is None else q_out.copy_(q)

    def attend(self, layer, q, meta, out):
        out = torch.empty_like(q) if out is None else out
        num_prefill_tokens, num_prefills = meta.num_prefill_tokens, meta.num_prefills
        if num_prefills:
            prefill_meta = replace(
                meta, query_start_loc_cpu=meta.query_start_loc_cpu[: num_prefills + 1],
                seq_lens_cpu=meta.seq_lens_cpu[:num_prefills],
            )
            out[:num_prefill_tokens] = paged_attention_reference(q[:num_prefill_tokens], layer.kv, prefill_meta,
                                                                 layer.scale)
        if meta.num_decodes:
            out[num_prefill_tokens:] = decode_attention_torch(
                q[num_prefill_tokens:], layer.kv, meta.seq_lens[num_prefills:], meta.block_tables[num_prefills:],
                layer.scale,
            )
        return out
