"""W8A8: 8-bit weights and 8-bit activations, multiplied on 8-bit tensor cores.

`quantization="fp8"`: e4m3 weights and activations (Ada and Hopper's FP8 tensor cores,
`torch._scaled_mm`); `quantization="w8a8"`: int8 weights and activations (`torch._int_mm`). Both
quantize their weights at load with one fp32 scale per output channel, and each token's activation
row at run time with one fp32 scale of its own (dynamic: no calibration data), so the product is
(x_codes @ w_codes^T) * x_scale[:, None] * w_scale[None, :]. Per-token and per-channel scales cost
one multiply per output and keep outlier tokens and channels from flattening everyone else's range.

Checkpoints already in FP8 (`quantization_config` with quant_method "fp8", as vLLM writes them: e4m3
`weight` and a per-tensor or per-channel `weight_scale`, dynamic activations) load as they are.

Where activations are quantized: by the RMSNorm (residual add fused) before the QKV and gate/up
projections, while the rows are in its registers: it asks the method it feeds (`input_format`) and
hands it `QuantizedRows` instead of rows in the model's dtype. Anything else is quantized by
`quantize_rows` in `apply`: o_proj's attention output, and SiLU*mul's result before down_proj (a
SiLU*mul kernel that quantized inside measured slower than the two kernels on an H200).

Up to SKINNY_MAX_TOKENS on a GPU there is no activation quantization: the 8-bit weight streams once
through `martlet.kernels.linear.skinny_linear` against activations in the model's dtype (W8A16), in
one launch, where per-token codes plus `torch._scaled_mm` take two and a cuBLAS kernel tuned for
large products.

SmoothQuant: quantized at load, a layer takes an optional `pre_quant_scale` from the checkpoint, one
factor p per input channel that its input is multiplied by before it is quantized: y = (x * p) W^T.
That is NVIDIA ModelOpt's name and meaning. (llm-compressor's SmoothQuant folds its factors into the
weights and norms before saving: its checkpoints carry none and need nothing.) Smoothing divides the
weight's columns by p and multiplies the activations by p where p is small for the channels with
outliers, so that the per-token activation scale is not set by a few channels. p is folded into the
RMSNorm before a layer, so it costs nothing at run time: q, k and v (and gate and up) share their
norm's input and so must share p, as ModelOpt exports them. A layer no norm feeds (o_proj,
down_proj) multiplies its own weight columns by p: the same product, unsmoothed. Without the
tensor, p is ones.

On a CPU (and in CI) the same codes and scales go through the PyTorch reference: both operands
dequantized to fp32, then multiplied, which is what the tensor cores compute up to summation order.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from martlet.layers.kv_cache import KV_FORMATS, KVFormat, dequantize, quantize
from martlet.layers.quantization.base import LinearMethod, QuantizationConfig, checkpoint_parameter, register_bias

# `torch._int_mm` on CUDA wants more than 16 rows: fewer are padded to this many.
INT_MM_MIN_ROWS = 32
# Up to this many tokens on a GPU (at most kernels.linear.MAX_TOKENS): the W8A16 skinny kernel, no
# activation codes. A guess: benchmarks/gpu_w8a8.sh times both paths at 1 to 64 tokens on 7B shapes.
SKINNY_MAX_TOKENS = 16


class QuantizedRows(NamedTuple):
    """Activations quantized per token: codes [T, K], fp32 scales [T], and the model's dtype."""

    codes: torch.Tensor
    scales: torch.Tensor
    dtype: torch.dtype


def quantize_activations(rows: torch.Tensor, fmt: KVFormat) -> QuantizedRows:
    """Rows [T, K] to codes and a scale per token: the Triton kernel on a GPU, the reference elsewhere."""
    if rows.is_cuda:
        from martlet.kernels.quantize import quantize_rows

        return QuantizedRows(*quantize_rows(rows.contiguous(), fmt), rows.dtype)
    return QuantizedRows(*quantize(rows, fmt, torch.float32), rows.dtype)


def check_device(fmt: KVFormat, device: torch.device) -> None:
    """W8A8 on a GPU needs its format's tensor cores: say so rather than run something else."""
    if device.type != "cuda":
        return
    capability = torch.cuda.get_device_capability(device)
    if fmt.dtype == torch.float8_e4m3fn and capability < (8, 9):
        raise ValueError(
            f"quantization='fp8' needs FP8 tensor cores (compute capability 8.9 or newer: Ada, Hopper); "
            f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}. "
            "quantization='w8a8' (int8) or 'int8' (weight-only) run there")


class W8A8Config(QuantizationConfig):
    """Quantized at load: `quantization="fp8" | "w8a8"`."""

    def __init__(self, name: str) -> None:
        if name not in ("fp8", "w8a8"):
            raise ValueError(f"unknown W8A8 quantization {name!r}; choose 'fp8' or 'w8a8'")
        self.name = name
        self.format = KV_FORMATS["fp8" if name == "fp8" else "int8"]

    def linear_method(self, prefix: str) -> W8A8Method:
        return W8A8Method(self.format)


class FP8CheckpointConfig(QuantizationConfig):
    """A checkpoint stored in FP8: e4m3 weights with their scales, activations quantized per token."""

    name = "fp8"

    def __init__(self, quantization_config: dict) -> None:
        if quantization_config.get("weight_block_size"):
            raise ValueError("FP8 checkpoints with block-wise weight scales (weight_block_size) are not supported; "
                             "Martlet loads per-tensor and per-channel weight_scale")
        scheme = quantization_config.get("activation_scheme", "dynamic")
        if scheme != "dynamic":
            raise ValueError(f"FP8 checkpoints with activation_scheme {scheme!r} are not supported; Martlet "
                             "quantizes activations per token at run time ('dynamic')")
        self.format = KV_FORMATS["fp8"]

    def linear_method(self, prefix: str) -> W8A8Method:
        return W8A8Method(self.format, from_checkpoint=True)


class W8A8Method(LinearMethod):
    def __init__(self, fmt: KVFormat, from_checkpoint: bool = False) -> None:
        self.format, self.from_checkpoint = fmt, from_checkpoint
        self.input_smoothing: torch.Tensor | None = None  # pre_quant_scale until a norm takes it

    def create_weights(self, layer: nn.Module, in_features: int, out_features: int, bias: bool) -> None:
        if self.from_checkpoint:
            layer.weight = checkpoint_parameter((out_features, in_features), self.format.dtype)
            layer.weight_scale = checkpoint_parameter((out_features,), torch.float32)
            layer.weight_scale.scalar_fills_rows = True  # a per-tensor scale: one number for its rows
        else:
            layer.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
            # Shared by all outputs (output_dim None): each shard of a merged layer holds all of it.
            layer.pre_quant_scale = nn.Parameter(torch.ones(in_features), requires_grad=False)
            layer.pre_quant_scale.output_dim, layer.pre_quant_scale.optional = None, True
            self.input_smoothing = layer.pre_quant_scale
        register_bias(layer, out_features, bias)

    def take_input_smoothing(self) -> torch.Tensor | None:
        smoothing, self.input_smoothing = self.input_smoothing, None
        return smoothing

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        weight = layer.weight.data
        check_device(self.format, weight.device)
        if self.from_checkpoint:
            codes, scales = weight, layer.weight_scale.data.float()
            del layer.weight_scale
        else:
            if self.input_smoothing is not None:  # no norm folded it in: the weight does
                weight = weight.float() * self.input_smoothing.float()
            codes, scales = quantize(weight, self.format, torch.float32)
            del layer.pre_quant_scale
            self.input_smoothing = None
        del layer.weight
        layer.register_buffer("weight_codes", codes.contiguous())  # [N, K]: its transpose is column-major
        layer.register_buffer("weight_scale", scales.reshape(1, -1), persistent=False)

    def input_format(self, num_tokens: int, device: torch.device) -> KVFormat | None:
        if device.type == "cuda" and num_tokens <= SKINNY_MAX_TOKENS:
            return None
        return self.format

    def apply(self, layer: nn.Module, x: torch.Tensor | QuantizedRows) -> torch.Tensor:
        if isinstance(x, QuantizedRows):
            return self._matmul(layer, x)
        rows = x.reshape(-1, x.shape[-1])
        if self.input_format(rows.shape[0], rows.device) is None:
            from martlet.kernels.linear import skinny_linear

            out = skinny_linear(rows, layer.weight_codes, layer.bias, weight_scale=layer.weight_scale[0])
        else:
            out = self._matmul(layer, quantize_activations(rows, self.format))
        return out.reshape(*x.shape[:-1], -1)

    def apply_silu_and_mul(self, layer: nn.Module, x: torch.Tensor | QuantizedRows) -> torch.Tensor | QuantizedRows:
        """The result feeds the MLP's down projection, a layer of this format: quantized for it here
        where it wants codes; where it does not, the skinny kernel applies SiLU too (up to its
        SILU_AND_MUL_MAX_TOKENS)."""
        num_tokens = x.codes.shape[0] if isinstance(x, QuantizedRows) else x.shape[0]
        fmt = self.input_format(num_tokens, layer.weight_codes.device)
        if fmt is None:
            from martlet.kernels.linear import SILU_AND_MUL_MAX_TOKENS, skinny_linear

            if num_tokens <= SILU_AND_MUL_MAX_TOKENS:
                return skinny_linear(x, layer.weight_codes, silu_and_mul=True, weight_scale=layer.weight_scale[0])
            return super().apply_silu_and_mul(layer, x)
        return quantize_activations(super().apply_silu_and_mul(layer, x), fmt)

    def _matmul(self, layer: nn.Module, x: QuantizedRows) -> torch.Tensor:
        if x.codes.is_cuda:
            out = self._tensor_core_matmul(x.codes, x.scales, layer, x.dtype)
        else:
            weight = dequantize(layer.weight_codes, layer.weight_scale[0])
            out = (dequantize(x.codes, x.scales) @ weight.T).to(x.dtype)
        return out if layer.bias is None else out + layer.bias

    def _tensor_core_matmul(
        self, codes: torch.Tensor, scales: torch.Tensor, layer: nn.Module, out_dtype: torch.dtype
    ) -> torch.Tensor:
        weight = layer.weight_codes.T
        if self.format.dtype == torch.float8_e4m3fn:
            return torch._scaled_mm(codes, weight, scale_a=scales[:, None], scale_b=layer.weight_scale,
                                    out_dtype=out_dtype)
        num_rows = codes.shape[0]
        if num_rows < INT_MM_MIN_ROWS:
            codes = torch.cat([codes, codes.new_zeros(INT_MM_MIN_ROWS - num_rows, codes.shape[1])])
        from martlet.kernels.quantize import scale_sums

        return scale_sums(torch._int_mm(codes, weight)[:num_rows], scales, layer.weight_scale[0], out_dtype)
