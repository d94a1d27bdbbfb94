"""The model's linear layer: cuBLAS for many tokens, one Triton weight pass for a few.

A decode step at small batch multiplies a handful of token rows by every weight matrix: the time
is the weight's trip from memory. `martlet.kernels.linear.skinny_linear` makes that trip in one
launch, where cuBLAS adds a split-K reduce kernel for the narrower matrices.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            from martlet.kernels import linear

            if x.shape[0] <= linear.MAX_TOKENS:
                return linear.skinny_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)
