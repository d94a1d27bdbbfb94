"""The KV cache pool: its formats, its allocation, and the reference quantize / dequantize.

A layer's cache is K and V, each `[num_blocks, num_kv_heads, block_size, head_dim]` (the layout
`martlet/kernels/__init__.py` explains). In the model's dtype ("auto") that is all. An 8-bit format
stores each row of `head_dim` channels as 8-bit codes and one fp16 scale per (token, KV head):

    x ~= code * scale,   scale = max|x| / max_code   (127 for int8, 448 for fp8 e4m3)

The scale of a (block, head) tile's 16 rows sits right after its codes, so the tile and its scales
are one contiguous run of memory (V's codes channel-major within it: see martlet/kernels/__init__.py;
2,080 bytes for 16 x 128, against 4,096 in fp16: 1.97x the
tokens in the same memory). Scales are computed as the row is written, from the row alone: no
calibration, and a prefix-cache hit or a recomputed sequence gets exactly the codes it had.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCALE_DTYPE = torch.float16


@dataclass(frozen=True)
class KVFormat:
    """An 8-bit KV cache format: the code dtype and the largest code magnitude."""

    name: str
    dtype: torch.dtype
    max_code: float


KV_FORMATS = {
    "int8": KVFormat("int8", torch.int8, 127.0),
    "fp8": KVFormat("fp8", torch.float8_e4m3fn, 448.0),
}


@dataclass
class LayerKV:
    """One layer's views into the pool. `k_scale`/`v_scale` are None for an unquantized cache."""

    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None

    @property
    def format(self) -> KVFormat | None:
        return None if self.k_scale is None else next(f for f in KV_FORMATS.values() if f.dtype == self.k.dtype)


def kv_format(name: str) -> KVFormat | None:
    """The 8-bit format for a `kv_cache_dtype`, or None for "auto" (the model's dtype)."""
    return None if name == "auto" else KV_FORMATS[name]


def tile_bytes(block_size: int, head_dim: int, model_dtype: torch.dtype, fmt: KVFormat | None) -> int:
    """Bytes of one (block, KV head) tile of K or of V, scales included."""
    if fmt is None:
        return block_size * head_dim * model_dtype.itemsize
    return block_size * head_dim * fmt.dtype.itemsize + block_size * SCALE_DTYPE.itemsize


def allocate_kv_cache(
    num_layers: int, num_blocks: int, num_kv_heads: int, block_size: int, head_dim: int,
    model_dtype: torch.dtype, fmt: KVFormat | None, device: torch.device,
) -> tuple[torch.Tensor, list[LayerKV]]:
    """One zeroed pool for every layer's K and V, and each layer's views into it.

    Zeroed so that padding reads of never-written slots see numbers (and scale 0), not NaN patterns.
    """
    shape = (2, num_layers, num_blocks, num_kv_heads)
    if fmt is None:
        pool = torch.zeros(*shape, block_size, head_dim, dtype=model_dtype, device=device)
        return pool, [LayerKV(pool[0, i], pool[1, i]) for i in range(num_layers)]
    codes_bytes = block_size * head_dim * fmt.dtype.itemsize
    pool = torch.zeros(*shape, tile_bytes(block_size, head_dim, model_dtype, fmt), dtype=torch.uint8, device=device)

    def codes(tiles: torch.Tensor, channel_major: bool = False) -> torch.Tensor:
        flat = tiles[..., :codes_bytes].view(fmt.dtype)
        if channel_major:  # stored [head_dim, block_size], seen as [block_size, head_dim]
            return flat.unflatten(-1, (head_dim, block_size)).transpose(-1, -2)
        return flat.unflatten(-1, (block_size, head_dim))

    def scales(tiles: torch.Tensor) -> torch.Tensor:
        return tiles[..., codes_bytes:].view(SCALE_DTYPE)

    return pool, [
        LayerKV(codes(pool[0, i]), codes(pool[1, i], channel_major=True), scales(pool[0, i]), scales(pool[1, i]))
        for i in range(num_layers)
    ]


def quantize(
    x: torch.Tensor, fmt: KVFormat, scale_dtype: torch.dtype = SCALE_DTYPE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [..., D] to 8-bit codes [..., D] and one scale per row [...], in `scale_dtype`.

    The reference for the kernels that quantize (`martlet.kernels.quantize`: the KV cache write,
    W8A8's activations), which do the same fp32 operations in the same order, so both give the same
    codes: the scale is rounded to its dtype before the row is divided by it, and int8 rounds half
    away from zero. (W8A8 quantizes its weights and activations with it too, with fp32 scales.)
    """
    x = x.float()
    scale = (x.abs().amax(-1) / fmt.max_code).to(scale_dtype)
    s = scale.float()
    inv = torch.where(s > 0, 1.0 / s, 0.0)
    y = (x * inv[..., None]).clamp(-fmt.max_code, fmt.max_code)
    if fmt.dtype == torch.int8:
        y = torch.where(y >= 0, torch.floor(y + 0.5), torch.ceil(y - 0.5))
    return y.to(fmt.dtype), scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Codes [..., D] and scales [...] back to fp32 rows; an unquantized cache (scale None) as fp32."""
    if scale is None:
        return codes.float()
    return codes.float() * scale.float()[..., None]
