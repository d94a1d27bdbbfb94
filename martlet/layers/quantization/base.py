"""The seam where weight formats plug into the model: one `LinearMethod` object per linear layer.

The model builds its linear layers the same way whatever the format; each layer asks the
model's `QuantizationConfig` for its method, which creates the layer's tensors (in the
checkpoint's layout, so loading is a plain copy), turns them into the layout its kernels want
once they are all loaded, and does the multiplication. This is vLLM's LinearMethod idea.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from martlet.layers.activation import SiluAndMul
from martlet.layers.kv_cache import KVFormat

_silu_and_mul = SiluAndMul()  # the Triton kernel on CUDA, PyTorch otherwise


class LinearMethod(ABC):
    @abstractmethod
    def create_weights(self, layer: nn.Module, in_features: int, out_features: int, bias: bool) -> None:
        """Register the layer's parameters as the checkpoint stores them.

        A parameter whose output features are not its dimension 0, or are packed several to an
        element, says so with `output_dim` (None: shared by all outputs) and `pack_factor`
        attributes, so that the shards of a merged layer land in the right place.
        """

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Turn the loaded parameters into the layout `apply` reads; nothing to do by default."""
        return None

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """x [T, in_features] -> [T, out_features], bias included."""

    def input_format(self, num_tokens: int, device: torch.device) -> KVFormat | None:
        """The 8-bit format in which this method takes num_tokens input rows, quantized per token by
        the kernel that produces them (an RMSNorm) and passed to `apply` as W8A8's
        `QuantizedRows`; None, the default: rows in the model's dtype."""
        return None

    def take_input_smoothing(self) -> torch.Tensor | None:
        """Per-input-channel factors the input is to be multiplied by (SmoothQuant), for the norm
        before this layer to fold into its weight, once loaded; the layer then leaves them out."""
        return None

    def apply_silu_and_mul(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """For a gated MLP's merged [gate; up] layer: SiLU(x gate^T) * (x up^T). Methods with a
        kernel that fuses the activation override this."""
        return _silu_and_mul(self.apply(layer, x))


def checkpoint_parameter(
    shape: tuple[int, ...], dtype: torch.dtype | None = None, output_dim: int | None = 0, pack_factor: int = 1
) -> nn.Parameter:
    """An empty parameter for a checkpoint tensor, saying where its outputs are (see `create_weights`)."""
    param = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
    param.output_dim, param.pack_factor = output_dim, pack_factor
    return param


def register_bias(layer: nn.Module, out_features: int, bias: bool) -> None:
    layer.register_parameter("bias", nn.Parameter(torch.empty(out_features)) if bias else None)


class QuantizationConfig(ABC):
    """A model's weight format: which method each of its linear layers gets."""

    name: str

    @abstractmethod
    def linear_method(self, prefix: str) -> LinearMethod:
        """The method for the linear layer named `prefix` (e.g. "layers.3.self_attn.qkv_proj")."""
