"""GPTQ checkpoints (AutoGPTQ / GPTQModel / optimum layout), repacked at load without dequantizing.

Per linear layer, with K inputs, N outputs, b bits (4 or 8; p = 32 / b codes per int32) and
groups of g inputs (g = K for `group_size` -1):

    qweight [K / p, N] int32   codes packed along the inputs: input k of column n is bits
                               b * (k % p) of qweight[k // p, n]
    qzeros  [K / g, N / p]     zero points packed along the outputs, stored minus one in the
                               original "gptq" checkpoint format (not in "gptq_v2")
    scales  [K / g, N]
    g_idx   [K] int32          each input's group: k // g, or any order with act-order (desc_act)

    w[n, k] = scales[g_idx[k], n] * (code[k, n] - zero[g_idx[k], n])

Act-order quantizes inputs in order of importance, so group i holds the i-th g inputs of that
order. Sorting the inputs by group makes the groups contiguous again: the packed weight keeps the
sorted order, and the layer permutes x's columns the same way before the matmul.
"""

from __future__ import annotations

import torch
from torch import nn

from martlet.layers.quantization.base import QuantizationConfig, checkpoint_parameter, register_bias
from martlet.layers.quantization.packed import PackedFormat, PackedLinearMethod, pack, unpack

CHECKPOINT_FORMATS = {"gptq": 1, "gptq_v2": 0}  # what to add to a stored zero point


class GPTQConfig(QuantizationConfig):
    name = "gptq"

    def __init__(self, quantization_config: dict) -> None:
        qc = quantization_config
        self.bits = qc.get("bits")
        self.group_size = qc.get("group_size", -1)
        self.symmetric = qc.get("sym", True)
        self.checkpoint_format = qc.get("checkpoint_format", "gptq")
        problems = []
        if self.bits not in (4, 8):
            problems.append(f"bits={self.bits!r} (Martlet loads 4 and 8)")
        if not isinstance(self.group_size, int) or (self.group_size != -1 and self.group_size <= 0):
            problems.append(f"group_size={self.group_size!r}")
        if self.checkpoint_format not in CHECKPOINT_FORMATS:
            problems.append(f"checkpoint_format={self.checkpoint_format!r} (Martlet loads {list(CHECKPOINT_FORMATS)})")
        if qc.get("is_marlin_format"):
            problems.append("is_marlin_format=true")
        if qc.get("lm_head"):
            problems.append("lm_head=true (Martlet keeps the LM head unquantized)")
        if problems:
            raise ValueError(f"unsupported GPTQ quantization_config: {', '.join(problems)}")

    def linear_method(self, prefix: str) -> GPTQMethod:
        return GPTQMethod(self, prefix)


class GPTQMethod(PackedLinearMethod):
    def __init__(self, config: GPTQConfig, prefix: str) -> None:
        self.config, self.prefix = config, prefix

    def create_weights(self, layer: nn.Module, in_features: int, out_features: int, bias: bool) -> None:
        cfg = self.config
        group = in_features if cfg.group_size == -1 else cfg.group_size
        per_word = 32 // cfg.bits
        if in_features % group or group % per_word or out_features % per_word:
            raise ValueError(
                f"GPTQ layer {self.prefix} ({in_features} inputs, {out_features} outputs) does not fit "
                f"{cfg.bits}-bit groups of {group}: inputs must be whole groups, groups and outputs whole words of "
                f"{per_word}"
            )
        self.format = PackedFormat(cfg.bits, group, asymmetric=not cfg.symmetric)
        layer.qweight = checkpoint_parameter((in_features // per_word, out_features), torch.int32, output_dim=1)
        layer.qzeros = checkpoint_parameter((in_features // group, out_features // per_word), torch.int32, 1, per_word)
        layer.scales = checkpoint_parameter((in_features // group, out_features), output_dim=1)
        layer.g_idx = checkpoint_parameter((in_features,), torch.int32, output_dim=None)
        register_bias(layer, out_features, bias)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        fmt, bits = self.format, self.config.bits
        codes = unpack(layer.qweight.data.t().contiguous(), bits)  # [N, K]
        zeros = unpack(layer.qzeros.data, bits) + CHECKPOINT_FORMATS[self.config.checkpoint_format]  # [K/g, N]
        scales = layer.scales.data.t()  # [N, K/g]
        g_idx = layer.g_idx.data.long()
        input_perm = None
        if not torch.equal(g_idx, torch.arange(g_idx.numel(), device=g_idx.device) // fmt.group_size):
            input_perm = torch.argsort(g_idx, stable=True)
            if not torch.equal(g_idx[input_perm], torch.arange(g_idx.numel(), device=g_idx.device) // fmt.group_size):
                raise ValueError(f"GPTQ layer {self.prefix}: g_idx does not put {fmt.group_size} inputs in each group")
            codes = codes[:, input_perm]
        mid = 2 ** (bits - 1)
        if fmt.asymmetric:
            offsets = -zeros.t().to(scales.dtype) * scales
        elif bool((zeros == mid).all()):
            offsets = None  # w = (code - mid) * scale: the symmetric format, no offsets to stream
        else:
            raise ValueError(f"GPTQ layer {self.prefix}: sym=true, but not all its zero points are {mid}")
        self.set_packed(layer, pack(codes, bits), scales, offsets, input_perm)
