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


def _few_tokens_on_gpu(x: torch.Tensor) -> bool:
    from martlet.kernels import linear

    return x.is_cuda and x.shape[0] <= linear.MAX_TOKENS


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _few_tokens_on_gpu(x):
            from martlet.kernels.linear import skinny_linear

            return skinny_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


class SiluGateUpLinear(nn.Linear):
    """A gated MLP's merged [gate; up] projection with its activation: x -> SiLU(x gate^T) * (x up^T).

    For a few tokens on the GPU the activation runs on the matmul's accumulators, in the same
    kernel; otherwise the projection and `SiluAndMul` run one after the other.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _few_tokens_on_gpu(x):
            from martlet.kernels.linear import skinny_linear

            return skinny_linear(x, self.weight, silu_and_mul=True)
        return self.act(F.linear(x, self.weight))
