"""RMSNorm, with the residual add fused in when a residual is passed.

The residual stream is updated in place: it stays one tensor from the embeddings to the final
norm, which a piecewise CUDA graph needs (every piece finds it at the same address).

A norm built with `feeds`, the method of the linear layer its output goes into, returns that
layer's input in the form the method asks for (`LinearMethod.input_format`): W8A8 takes 8-bit codes
and a scale per token, which the norm's kernel computes while the row is in registers. Its
SmoothQuant factors, where the checkpoint has them, are folded into the norm's weight at load.
"""

from __future__ import annotations

import torch
from torch import nn

from martlet.layers.kv_cache import KVFormat, quantize
from martlet.layers.quantization.base import LinearMethod
from martlet.layers.quantization.w8a8 import QuantizedRows


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Reference RMSNorm: statistics in fp32, result in x's dtype (as Hugging Face computes it)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, feeds: LinearMethod | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.feeds = feeds

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor | QuantizedRows:
        """Without residual: norm(x). With it: residual += x in place, then norm(residual)."""
        fmt = None if self.feeds is None else self.feeds.input_format(x.shape[0], x.device)
        if fmt is not None:
            return self._quantized(x, residual, fmt)
        if x.is_cuda:
            from martlet.kernels.norm import rms_norm as rms_norm_triton

            return rms_norm_triton(x, self.weight, self.eps, residual)
        if residual is None:
            return rms_norm(x, self.weight, self.eps)
        return rms_norm(residual.add_(x), self.weight, self.eps)

    def fold_input_smoothing(self) -> None:
        """After loading: the layer this norm feeds takes its input multiplied by these factors."""
        smoothing = None if self.feeds is None else self.feeds.take_input_smoothing()
        if smoothing is not None:
            self.weight.data.copy_(self.weight.float() * smoothing.float())

    def _quantized(self, x: torch.Tensor, residual: torch.Tensor | None, fmt: KVFormat) -> QuantizedRows:
        if x.is_cuda:
            from martlet.kernels.norm import rms_norm_quantized

            return QuantizedRows(*rms_norm_quantized(x, self.weight, self.eps, fmt, residual), x.dtype)
        normed = rms_norm(x if residual is None else residual.add_(x), self.weight, self.eps)
        return QuantizedRows(*quantize(normed, fmt, torch.float32), normed.dtype)
