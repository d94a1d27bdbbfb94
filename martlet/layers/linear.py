"""The model's linear layers: cuBLAS for many tokens, one Triton weight pass for a few.

A decode step at small batch multiplies a handful of token rows by every weight matrix: the time
is the weight's trip from memory. `martlet.kernels.linear` makes that trip in one launch, where
cuBLAS adds a split-K reduce kernel for the narrower matrices, and does the small work on either
side of it in the same launch: the RMSNorm before a block's first projection, the SiLU gate after
the MLP's [gate; up] projection. At batch 1 every launch saved is a few microseconds of a ~4 ms step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from martlet.layers.activation import SiluAndMul
from martlet.layers.norm import RMSNorm


class Linear(nn.Linear):
    gated = False  # SiluGateUpLinear: the weight is [gate; up] and the layer returns SiLU(x gate^T) * (x up^T)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x, None, None)[0]

    def forward_normed(
        self, x: torch.Tensor, norm: RMSNorm, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer applied to norm(x + residual), and x + residual (x itself without a residual): a
        pre-norm block's norm and first projection."""
        return self._forward(x, norm, residual)

    def _forward(
        self, x: torch.Tensor, norm: RMSNorm | None, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        kernels = _kernels() if x.is_cuda else None
        gate_fused = False
        if kernels and x.shape[0] <= kernels.MAX_TOKENS:
            gate_fused = self.gated and x.shape[0] <= kernels.SILU_AND_MUL_MAX_TOKENS
            if norm is None:
                y = kernels.skinny_linear(x, self.weight, self.bias, silu_and_mul=gate_fused)
            else:
                y, residual = kernels.skinny_norm_linear(x, residual, norm.weight, norm.eps, self.weight, self.bias,
                                                         silu_and_mul=gate_fused)
        else:
            if norm is not None:
                x, residual = (norm(x), x) if residual is None else norm(x, residual)
            y = F.linear(x, self.weight, self.bias)
        return (self.act(y) if self.gated and not gate_fused else y), residual


class SiluGateUpLinear(Linear):
    """A gated MLP's merged [gate; up] projection with its activation: x -> SiLU(x gate^T) * (x up^T).

    For up to 16 tokens on the GPU the activation runs on the matmul's accumulators, in the same
    kernel; otherwise the projection and the activation run one after the other.
    """

    gated = True

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.act = SiluAndMul()


def _kernels():
    from martlet.kernels import linear  # Triton is imported only where a GPU path runs

    return linear
