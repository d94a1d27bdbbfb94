"""Quantized linear layers: the per-layer method seam (`base`), the packed layout every format is
repacked into and its kernels' reference (`packed`), and the formats: round to nearest at load
(`rtn`: int8, int4), GPTQ and AWQ checkpoints, GGUF blocks kept packed (`martlet.models.gguf`); and
W8A8, 8-bit weights and activations on 8-bit tensor cores (`w8a8`: fp8, int8, FP8 checkpoints)."""

from __future__ import annotations

from martlet.layers.quantization.base import LinearMethod, QuantizationConfig

__all__ = ["LinearMethod", "QuantizationConfig", "from_checkpoint", "from_name"]


def from_name(name: str) -> QuantizationConfig:
    """`quantization="int8" | "int4"` (weight-only) or `"fp8" | "w8a8"` (W8A8): quantized at load."""
    from martlet.layers.quantization.rtn import RoundToNearestConfig
    from martlet.layers.quantization.w8a8 import W8A8Config

    return W8A8Config(name) if name in ("fp8", "w8a8") else RoundToNearestConfig(name)


def from_checkpoint(quantization_config: dict) -> QuantizationConfig:
    """The format of a pre-quantized checkpoint, from its config.json's `quantization_config`."""
    from martlet.layers.quantization.awq import AWQConfig
    from martlet.layers.quantization.gptq import GPTQConfig
    from martlet.layers.quantization.w8a8 import FP8CheckpointConfig

    configs = {"gptq": GPTQConfig, "awq": AWQConfig, "fp8": FP8CheckpointConfig}
    method = str(quantization_config.get("quant_method", "")).lower()
    if method not in configs:
        raise ValueError(f"unsupported quantization_config quant_method {method!r}; Martlet loads "
                         f"{', '.join(configs)} checkpoints (or quantizes at load with quantization='int8'|'int4')")
    return configs[method](quantization_config)
