"""AWQ checkpoints (AutoAWQ's GEMM layout), repacked at load without dequantizing.

Per linear layer, with K inputs, N outputs and groups of g inputs, 4-bit codes packed eight to an
int32 along the outputs, in AutoAWQ's interleaved order (nibble i of a word holds output
8 * word + AWQ_ORDER[i], which suits its GEMM kernel's dequantization):

    qweight [K, N / 8] int32
    qzeros  [K / g, N / 8] int32   zero points, packed the same way
    scales  [K / g, N]

    w[n, k] = scales[k // g, n] * (code[k, n] - zero[k // g, n])
"""

from __future__ import annotations

import torch
from torch import nn

from martlet.layers.quantization.base import QuantizationConfig, checkpoint_parameter, register_bias
from martlet.layers.quantization.packed import PackedFormat, PackedLinearMethod, pack, unpack

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# Where output j of a word's eight sits among its nibbles: the inverse of AWQ_ORDER.
NIBBLE_OF_OUTPUT = tuple(AWQ_ORDER.index(j) for j in range(8))


class AWQConfig(QuantizationConfig):
    name = "awq"

    def __init__(self, quantization_config: dict) -> None:
        qc = quantization_config
        self.group_size = qc.get("group_size", qc.get("q_group_size"))
        bits = qc.get("bits", qc.get("w_bit"))
        version = str(qc.get("version", "gemm")).lower()
        problems = []
        if bits != 4:
            problems.append(f"bits={bits!r} (Martlet loads 4)")
        if not isinstance(self.group_size, int) or self.group_size <= 0:
            problems.append(f"group_size={self.group_size!r}")
        if version != "gemm":
            problems.append(f"version={version!r} (Martlet loads AutoAWQ's 'gemm' packing)")
        if not qc.get("zero_point", True):
            problems.append("zero_point=false")
        if skipped := qc.get("modules_to_not_convert"):
            problems.append(f"modules_to_not_convert={skipped!r} (Martlet needs every linear layer quantized)")
        if problems:
            raise ValueError(f"unsupported AWQ quantization_config: {', '.join(problems)}")

    def linear_method(self, prefix: str) -> AWQMethod:
        return AWQMethod(self.group_size, prefix)


def _unpack_outputs(packed: torch.Tensor) -> torch.Tensor:
    """[rows, N / 8] AWQ words -> [rows, N] codes in output order."""
    nibbles = unpack(packed, 4)
    rows, n = nibbles.shape
    order = torch.tensor(NIBBLE_OF_OUTPUT, device=packed.device)
    return nibbles.view(rows, n // 8, 8)[:, :, order].reshape(rows, n)


class AWQMethod(PackedLinearMethod):
    def __init__(self, group_size: int, prefix: str) -> None:
        self.group_size, self.prefix = group_size, prefix

    def create_weights(self, layer: nn.Module, in_features: int, out_features: int, bias: bool) -> None:
        g = self.group_size
        if in_features % g or g % 8 or out_features % 8:
            raise ValueError(
                f"AWQ layer {self.prefix} ({in_features} inputs, {out_features} outputs) does not fit groups of {g}: "
                "inputs must be whole groups, groups and outputs multiples of 8"
            )
        self.format = PackedFormat(4, g, asymmetric=True)
        layer.qweight = checkpoint_parameter((in_features, out_features // 8), torch.int32, output_dim=1, pack_factor=8)
        layer.qzeros = checkpoint_parameter((in_features // g, out_features // 8), torch.int32, 1, pack_factor=8)
        layer.scales = checkpoint_parameter((in_features // g, out_features), output_dim=1)
        register_bias(layer, out_features, bias)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        codes = _unpack_outputs(layer.qweight.data).t().contiguous()  # [N, K]
        zeros = _unpack_outputs(layer.qzeros.data).t()  # [N, K/g]
        scales = layer.scales.data.t()
        self.set_packed(layer, pack(codes, 4), scales, -zeros.to(scales.dtype) * scales)
