"""The model's linear layers. How a layer stores its weight and multiplies by it is its
`LinearMethod` (`martlet.layers.quantization`): the model builds every layer the same way and the
format decides the rest.

Unquantized: cuBLAS for many tokens, one Triton weight pass for a few. A decode step at small
batch multiplies a handful of token rows by every weight matrix: the time is the weight's trip
from memory. `martlet.kernels.linear.skinny_linear` makes that trip in one launch, where cuBLAS
adds a split-K reduce kernel for the narrower matrices.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from martlet.layers.quantization.base import LinearMethod, QuantizationConfig, register_bias


class UnquantizedLinearMethod(LinearMethod):
    def create_weights(self, layer: nn.Module, in_features: int, out_features: int, bias: bool) -> None:
        layer.weight = nn.Parameter(torch.empty(out_features, in_features))
        register_bias(layer, out_features, bias)

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            from martlet.kernels import linear

            if x.shape[0] <= linear.MAX_TOKENS:
                return linear.skinny_linear(x, layer.weight, layer.bias)
        return F.linear(x, layer.weight, layer.bias)

    def apply_silu_and_mul(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Up to 16 tokens on the GPU the activation runs on the matmul's accumulators, in the same kernel."""
        if x.is_cuda:
            from martlet.kernels import linear

            if x.shape[0] <= linear.SILU_AND_MUL_MAX_TOKENS:
                return linear.skinny_linear(x, layer.weight, silu_and_mul=True)
        return super().apply_silu_and_mul(layer, x)


class Linear(nn.Module):
    """y = x W^T + b, W stored as the model's `QuantizationConfig` says (unquantized without one)."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, quant: QuantizationConfig | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.method = UnquantizedLinearMethod() if quant is None else quant.linear_method(prefix)
        self.method.create_weights(self, in_features, out_features, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x)


class SiluGateUpLinear(Linear):
    """A gated MLP's merged [gate; up] projection with its activation: x -> SiLU(x gate^T) * (x up^T)."""

    def __init__(
        self, in_features: int, out_features: int, quant: QuantizationConfig | None = None, prefix: str = ""
    ) -> None:
        super().__init__(in_features, out_features, bias=False, quant=quant, prefix=prefix)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply_silu_and_mul(self, x)


def load_weight(param: nn.Parameter, tensor: torch.Tensor, name: str, rows: slice | None = None) -> None:
    """Copy checkpoint tensor `name` into `param`, or into output rows `rows` of a merged layer's param.

    Quantized checkpoints store some tensors with the outputs in dimension 1, or several outputs
    packed into one element: such a param carries `output_dim` (None: shared by every output, so
    each shard holds all of it) and `pack_factor` attributes. A param with `scalar_fills_rows` (FP8's
    weight scales) takes one number for all its rows as well as one per row.
    """
    target = param.data
    output_dim = getattr(param, "output_dim", 0)
    if rows is not None and output_dim is not None:
        pack = getattr(param, "pack_factor", 1)
        if rows.start % pack or rows.stop % pack:
            raise ValueError(f"{name}: output rows {rows.start}:{rows.stop} are not whole packed elements of {pack}")
        target = target.narrow(output_dim, rows.start // pack, (rows.stop - rows.start) // pack)
    if getattr(param, "scalar_fills_rows", False) and tensor.numel() in (1, target.numel()):
        tensor = tensor.reshape(-1).expand(target.numel()).reshape(target.shape)  # per tensor or per row
    if target.shape != tensor.shape:
        raise ValueError(f"checkpoint tensor {name!r} is {tuple(tensor.shape)}, expected {tuple(target.shape)}")
    target.copy_(tensor)
