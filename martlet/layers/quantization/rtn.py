"""Quantize at load, by round to nearest, from any checkpoint: `quantization="int8" | "int4"`.

int8 is W8A16 with one symmetric scale per output channel: 8 bits keep the weights within 1/254
of each row's largest magnitude, so a per-row scale loses almost nothing and costs nothing in the
loop (the kernel scales the sums). int4 is W4A16 in groups of 128 inputs, or of the largest of 64,
32, 16 that divides the layer's input width, asymmetric: each group's 16 levels span its own
[min, max] (a scale and an offset, as llama.cpp's Q4_1), which wastes no level on a range the group
does not use, where a symmetric grid spends levels on the side of zero the group barely reaches.
"""

from __future__ import annotations

import torch
from torch import nn

from martlet.layers.quantization.base import QuantizationConfig, register_bias
from martlet.layers.quantization.packed import PackedFormat, PackedLinearMethod, quantize

INT4_GROUP_SIZES = (128, 64, 32, 16)


def int4_group_size(in_features: int, prefix: str) -> int:
    for size in INT4_GROUP_SIZES:
        if in_features % size == 0:
            return size
    raise ValueError(f"int4 needs a layer's input width to be a multiple of 16 (groups of 16 to 128); "
                     f"{prefix} has {in_features} inputs")


class RoundToNearestConfig(QuantizationConfig):
    def __init__(self, name: str) -> None:
        if name not in ("int8", "int4"):
            raise ValueError(f"unknown quantization {name!r}; quantized at load: 'int8' or 'int4'")
        self.name = name

    def linear_method(self, prefix: str) -> RoundToNearestMethod:
        return RoundToNearestMethod(self.name, prefix)


class RoundToNearestMethod(PackedLinearMethod):
    """The layer loads full-precision weights as usual; they are quantized once all are in."""

    def __init__(self, name: str, prefix: str) -> None:
        self.name, self.prefix = name, prefix

    def create_weights(self, layer: nn.Module, in_features: int, out_features: int, bias: bool) -> None:
        if self.name == "int8":
            self.format = PackedFormat(8, in_features, asymmetric=False)
        else:
            self.format = PackedFormat(4, int4_group_size(in_features, self.prefix), asymmetric=True)
        if in_features % self.format.pack:
            raise ValueError(f"{self.name} packs {self.format.pack} inputs to a word; {self.prefix} has {in_features}")
        layer.weight = nn.Parameter(torch.empty(out_features, in_features))
        register_bias(layer, out_features, bias)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        qweight, scales, offsets = quantize(layer.weight.data, self.format, layer.weight.dtype)
        self.set_packed(layer, qweight, scales, offsets)
