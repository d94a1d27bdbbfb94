"""The model's linear layers: cuBLAS for many tokens, one Triton weight pass for a few.

A decode step at small batch multiplies a handful of token rows by every weight matrix: the time
is the weight's trip from memory. `martlet.kernels.linear.skinny_linear` makes that trip in one
launch, where cuBLAS adds a split-K reduce kernel for the narrower matrices.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from martlet.layers.activation import SiluAndMul


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            from martlet.kernels import linear

            if x.shape[0] <= linear.MAX_TOKENS:
                return linear.skinny_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


class SiluGateUpLinear(Linear):
    """A gated MLP's merged [gate; up] projection with its activation: x -> SiLU(x gate^T) * (x up^T).

    For up to 16 tokens on the GPU the activation runs on the matmul's accumulators, in the same
    kernel; otherwise the projection and `SiluAndMul` run one after the other.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            from martlet.kernels import linear

            if x.shape[0] <= linear.SILU_AND_MUL_MAX_TOKENS:
                return linear.skinny_linear(x, self.weight, silu_and_mul=True)
        return self.act(super().forward(x))
