"""RMSNorm, with the residual add fused in when a residual is passed.

The residual stream is updated in place: it stays one tensor from the embeddings to the final
norm, which a piecewise CUDA graph needs (every piece finds it at the same address).
"""

from __future__ import annotations

import torch
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Reference RMSNorm: statistics in fp32, result in x's dtype (as Hugging Face computes it)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """Without residual: norm(x). With it: residual += x in place, then norm(residual)."""
        if x.is_cuda:
            from martlet.kernels.norm import rms_norm as rms_norm_triton

            return rms_norm_triton(x, self.weight, self.eps, residual)
        if residual is None:
            return rms_norm(x, self.weight, self.eps)
        return rms_norm(residual.add_(x), self.weight, self.eps)
