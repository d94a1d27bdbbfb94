"""Attention backends by name. Here rather than in `attention.py`, which the Triton backend imports:
choosing between the two from there would make the modules import each other."""

from __future__ import annotations

from martlet.layers.attention import AttentionBackend, TorchAttentionBackend


def get_attention_backend(name: str) -> AttentionBackend:
    """"torch": the PyTorch reference (the CPU path); "triton": the Triton kernels (CUDA, or the
    interpreter)."""
    if name == "torch":
        return TorchAttentionBackend()
    if name == "triton":
        from martlet.kernels.backend import TritonAttentionBackend  # imports Triton: only when asked

        return TritonAttentionBackend()
    raise ValueError(f"unknown attention_backend {name!r}; choose 'torch' or 'triton'")
