"""Weight-only quantization: the per-layer method seam (`base`), the packed layout every format is
repacked into and its kernels' reference (`packed`), and the formats: round to nearest at load
(`rtn`: int8, int4), GPTQ and AWQ checkpoints, GGUF blocks kept packed (`martlet.models.gguf`)."""

from __future__ import annotations

from martlet.layers.quantization.base import LinearMethod, QuantizationConfig

__all__ = ["LinearMethod", "QuantizationConfig", "from_checkpoint", "from_name"]


def from_name(name: str) -> QuantizationConfig:
    """`quantization="int8" | "int4"`: quantized at load."""
    from martlet.layers.quantization.rtn import RoundToNearestConfig

    return RoundToNearestConfig(name)


def from_checkpoint(quantization_config: dict) -> QuantizationConfig:
    """The format of a pre-quantized checkpoint, from its config.json's `quantization_config`."""
    from martlet.layers.quantization.awq import AWQConfig
    from martlet.layers.quantization.gptq import GPTQConfig

    configs = {"gptq": GPTQConfig, "awq": AWQConfig}
    method = str(quantization_config.get("quant_method", "")).lower()
    if method not in configs:
        raise ValueError(f"unsupported quantization_config quant_method {method!r}; Martlet loads "
                         f"{', '.join(configs)} checkpoints (or quantizes at load with quantization='int8'|'int4')")
    return configs[method](quantization_config)
