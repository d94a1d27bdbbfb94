"""The packed layout every weight-only format is repacked into, its PyTorch reference, and the
method that multiplies by it.

A weight [N, K] of `bits`-bit codes (4 or 8) is stored row by row as int32 words, `32 / bits`
codes to a word, lowest bits first: code (n, k) is `(qweight[n, k // pack] >> bits * (k % pack))
& (2^bits - 1)`. A row is then one contiguous run of words, which a kernel streaming the weight
reads coalesced. Each group of `group_size` inputs of a row has a scale, and, when asymmetric, an
offset (scales and offsets are [N, K / group_size], in the model's dtype):

    asymmetric: w = code * scale + offset          (llama.cpp's Q4_1; GPTQ's and AWQ's integer
                                                    zero point z is offset = -z * scale)
    symmetric:  w = (code - 2^(bits-1)) * scale

A format that permutes its inputs (GPTQ's act-order) keeps the permutation as `input_perm`, and
the layer gathers x's columns with it first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from martlet.layers.quantization.base import LinearMethod


@dataclass(frozen=True)
class PackedFormat:
    bits: int  # 4 or 8
    group_size: int  # inputs per scale; in_features for one scale per output channel
    asymmetric: bool  # an offset per group as well as a scale

    @property
    def pack(self) -> int:
        return 32 // self.bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes [N, K] (K a multiple of 32 / bits) -> int32 words [N, K / (32 / bits)]."""
    n, k = codes.shape
    per_word = 32 // bits
    shifts = torch.arange(per_word, device=codes.device) * bits
    words = (codes.long().view(n, k // per_word, per_word) << shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # the top code's high bit is the sign


def unpack(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 words [N, W] -> unsigned codes [N, W * (32 / bits)] (int32)."""
    shifts = torch.arange(32 // bits, device=qweight.device, dtype=torch.int32) * bits
    return ((qweight[..., None] >> shifts) & (2**bits - 1)).flatten(-2)


def dequantize(
    qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None, fmt: PackedFormat
) -> torch.Tensor:
    """The reference: the weight [N, K] in the scales' dtype, computed in fp32 and rounded once."""
    n, g = qweight.shape[0], fmt.group_size
    codes = unpack(qweight, fmt.bits).view(n, -1, g).float()
    scale = scales.float()[..., None]
    if fmt.asymmetric:
        weight = torch.addcmul(offsets.float()[..., None], codes, scale)
    else:
        weight = (codes - 2 ** (fmt.bits - 1)) * scale
    return weight.view(n, -1).to(scales.dtype)


def quantize(
    weight: torch.Tensor, fmt: PackedFormat, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round to nearest: weight [N, K] -> (qweight, scales, offsets), scales and offsets in `dtype`.

    Asymmetric groups span [min, max] with 2^bits levels; symmetric ones [-amax, amax] with
    2^bits - 1 levels (the lowest code is unused, so that 0 is exact and the range symmetric).
    Codes are rounded against the stored (rounded) scale and offset, which the kernels will use.
    """
    n, k = weight.shape
    groups = weight.float().view(n, k // fmt.group_size, fmt.group_size)
    if fmt.asymmetric:
        low = groups.amin(-1)
        scales = ((groups.amax(-1) - low) / (2**fmt.bits - 1)).to(dtype)
        offsets = low.to(dtype)
        codes = (groups - offsets.float()[..., None]) / scales.float().clamp_min(1e-30)[..., None]
        codes = codes.round().clamp(0, 2**fmt.bits - 1)
    else:
        mid = 2 ** (fmt.bits - 1)
        scales = (groups.abs().amax(-1) / (mid - 1)).to(dtype)
        offsets = None
        codes = (groups / scales.float().clamp_min(1e-30)[..., None]).round().clamp(1 - mid, mid - 1) + mid
    return pack(codes.view(n, k), fmt.bits), scales, offsets


class PackedLinearMethod(LinearMethod):
    """Multiplies by a weight in the packed layout. Subclasses say how a checkpoint's tensors get
    there: `create_weights` sets `format`, `process_weights_after_loading` ends with `set_packed`."""

    format: PackedFormat

    def set_packed(
        self, layer: nn.Module, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None,
        input_perm: torch.Tensor | None = None,
    ) -> None:
        """Make these the layer's tensors, in place of whatever the checkpoint layout left there."""
        n, k = layer.out_features, layer.in_features
        fmt = self.format
        expected = {"qweight": (n, k // fmt.pack), "scales": (n, k // fmt.group_size)}
        for name, tensor in (("qweight", qweight), ("scales", scales)):
            if tuple(tensor.shape) != expected[name]:
                raise ValueError(f"packed {name} is {tuple(tensor.shape)}, expected {expected[name]}")
        for name in ("weight", "qweight", "qzeros", "scales", "g_idx"):
            if hasattr(layer, name):
                delattr(layer, name)
        layer.qweight = nn.Parameter(qweight.contiguous(), requires_grad=False)
        layer.scales = nn.Parameter(scales.contiguous(), requires_grad=False)
        layer.register_parameter(
            "offsets", None if offsets is None else nn.Parameter(offsets.contiguous(), requires_grad=False)
        )
        layer.register_buffer("input_perm", input_perm)

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if layer.input_perm is not None:
            x = x.index_select(1, layer.input_perm)
        if x.is_cuda:
            from martlet.kernels import quant_linear

            if x.shape[0] <= quant_linear.kernel_max_tokens(self.format):
                return quant_linear.quant_linear(x, layer.qweight, layer.scales, layer.offsets, self.format, layer.bias)
            weight = quant_linear.dequantize(layer.qweight, layer.scales, layer.offsets, self.format)
        else:
            weight = dequantize(layer.qweight, layer.scales, layer.offsets, self.format)
        return F.linear(x, weight, layer.bias)

    def apply_silu_and_mul(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and layer.input_perm is None:
            from martlet.kernels import quant_linear

            if x.shape[0] <= quant_linear.kernel_max_tokens(self.format, silu_and_mul=True):
                return quant_linear.quant_linear(
                    x, layer.qweight, layer.scales, layer.offsets, self.format, silu_and_mul=True
                )
        return super().apply_silu_and_mul(layer, x)
