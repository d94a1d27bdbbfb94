"""GPTQ and AWQ checkpoints, and int8/int4 quantized at load, through the whole engine on the CPU.

The GPTQ and AWQ checkpoints are tiny random Llamas whose linear weights the tests pack here, from
each format's documented layout (written out again below, independently of Martlet's unpacking).
The same weights, dequantized by the format's own formula, saved as an ordinary checkpoint, are
the reference: greedy output must be token-identical. (transformers' GPTQ/AWQ loaders need CUDA
kernel packages, so no third-party reference runs on the CPU.)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from martlet.llm import LLM
from martlet.sampling_params import SamplingParams
from martlet.testing import make_tiny_model

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
PROMPTS = [{"prompt_token_ids": [1, 450, 4996, 17354, 1701, 29916]}, {"prompt_token_ids": [15043, 29892, 590]}]


def pack_words(codes: np.ndarray, axis: int, bits: int = 4, order: tuple[int, ...] | None = None) -> np.ndarray:
    """b-bit codes -> int32 words, 32 / b consecutive entries along `axis` to a word, entry order[i]
    in field i (lowest bits first)."""
    per_word = 32 // bits
    order = order or tuple(range(per_word))
    codes = np.moveaxis(codes.astype(np.uint32), axis, -1)
    groups = codes.reshape(*codes.shape[:-1], -1, per_word)
    words = sum(groups[..., order[i]] << np.uint32(bits * i) for i in range(per_word))
    return np.moveaxis(words.view(np.int32), -1, axis)


def quantized_linear(n: int, k: int, group: int, sym: bool, rng: np.random.Generator, input_perm=None, bits=4):
    """Random codes, zeros and scales of an [n, k] layer -> (codes [k, n], zeros [k/g, n], scales, g_idx, weight).

    Zero points start at 1: GPTQ's original format stores them minus one, so it cannot hold a 0.
    """
    codes = rng.integers(0, 2**bits, (k, n))
    zeros = np.full((k // group, n), 2 ** (bits - 1)) if sym else rng.integers(1, 2**bits, (k // group, n))
    scales = (rng.random((k // group, n)) * 0.02 + 0.005).astype(np.float16)
    g_idx = np.arange(k) // group
    if input_perm is not None:  # act-order: the i-th input in order of importance is in group i // g
        g_idx[input_perm] = np.arange(k) // group
    weight = scales[g_idx].astype(np.float32) * (codes - zeros[g_idx])  # [k, n]: the format's own formula
    return codes, zeros, scales, g_idx.astype(np.int32), torch.from_numpy(weight.T.copy())


def write_checkpoint(
    base: Path, out: Path, fmt: str, group: int, sym: bool = False, act_order: bool = False, bits: int = 4
) -> Path:
    """`base`'s model with its linear layers replaced by random packed ones: writes the `fmt` checkpoint
    to `out` and the dequantized reference beside it; returns the reference's path."""
    rng = np.random.default_rng(0)
    tensors = load_file(base / "model.safetensors")
    packed, reference = {}, {}
    perms: dict[tuple[str, str], np.ndarray] = {}
    for name, tensor in tensors.items():
        parts = name.split(".")
        if parts[-1] != "weight" or parts[-2] not in LINEARS:
            packed[name] = reference[name] = tensor
            continue
        n, k = tensor.shape
        # Layers that share an input (q/k/v, gate/up) share act-order's permutation, as GPTQ makes them.
        shared_input = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "mlp", "up_proj": "mlp"}
        key = (parts[2], shared_input.get(parts[-2], parts[-2]))
        perm = perms.setdefault(key, rng.permutation(k)) if act_order else None
        layer_group = k if group == -1 else group  # -1: one group per output channel
        codes, zeros, scales, g_idx, weight = quantized_linear(n, k, layer_group, sym, rng, perm, bits)
        stem = name.removesuffix(".weight")
        reference[name] = weight
        if fmt == "gptq":
            packed[f"{stem}.qweight"] = torch.from_numpy(pack_words(codes, axis=0, bits=bits))
            packed[f"{stem}.qzeros"] = torch.from_numpy(pack_words(zeros - 1, axis=1, bits=bits))  # stored minus one
            packed[f"{stem}.g_idx"] = torch.from_numpy(g_idx)
        else:
            packed[f"{stem}.qweight"] = torch.from_numpy(pack_words(codes, axis=1, order=AWQ_ORDER))
            packed[f"{stem}.qzeros"] = torch.from_numpy(pack_words(zeros, axis=1, order=AWQ_ORDER))
        packed[f"{stem}.scales"] = torch.from_numpy(scales)
    config = json.loads((base / "config.json").read_text())
    quantization_config = (
        {"quant_method": "gptq", "bits": bits, "group_size": group, "sym": sym, "desc_act": act_order}
        if fmt == "gptq" else {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
                               "version": "gemm"}
    )
    ref_dir = out.parent / f"{out.name}-reference"
    for path, weights, extra in ((out, packed, {"quantization_config": quantization_config}), (ref_dir, reference, {})):
        path.mkdir()
        save_file({k: v.contiguous() for k, v in weights.items()}, path / "model.safetensors")
        (path / "config.json").write_text(json.dumps({**config, **extra}))
        for file in base.glob("tokenizer*"):
            (path / file.name).write_bytes(file.read_bytes())
    return ref_dir


def greedy(path: Path, **kwargs) -> list[list[int]]:
    llm = LLM(str(path), device="cpu", dtype="float32", num_kv_blocks=16, max_model_len=64, quiet=True, **kwargs)
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    return [out.outputs[0].token_ids for out in outputs]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("quant_base") / "model", "llama")


@pytest.mark.parametrize(
    "fmt, group, sym, act_order, bits",
    [("gptq", 32, True, False, 4), ("gptq", 32, False, True, 4), ("gptq", -1, True, False, 8),
     ("awq", 32, False, False, 4), ("awq", 64, False, False, 4)],
)
def test_checkpoint_matches_its_dequantized_weights(base, tmp_path, fmt, group, sym, act_order, bits):
    reference = write_checkpoint(base, tmp_path / fmt, fmt, group, sym, act_order, bits)
    assert greedy(tmp_path / fmt) == greedy(reference)


@pytest.mark.parametrize("quantization_config, error", [
    ({"quant_method": "gptq", "bits": 3, "group_size": 128}, "bits=3"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "marlin"}, "checkpoint_format"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, "version='gemv'"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": False}, "zero_point"),
    ({"quant_method": "bitsandbytes"}, "quant_method 'bitsandbytes'"),
    ({"quant_method": "fp8", "weight_block_size": [128, 128]}, "weight_block_size"),
    ({"quant_method": "fp8", "activation_scheme": "static"}, "activation_scheme 'static'"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 32, "lm_head": True}, "lm_head"),
    ({"quant_method": "awq", "bits": 4, "group_size": 32, "modules_to_not_convert": ["mlp"]}, "modules_to_not_convert"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 48}, "does not fit"),  # 64 inputs are not whole groups of 48
])
def test_unsupported_quantization_config_is_named(base, tmp_path, quantization_config, error):
    path = tmp_path / "model"
    path.mkdir()
    config = json.loads((base / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "quantization_config": quantization_config}))
    for file in base.glob("tokenizer*"):
        (path / file.name).write_bytes(file.read_bytes())
    with pytest.raises(ValueError, match=error):
        LLM(str(path), device="cpu", dtype="float32", quiet=True)


def test_quantizing_a_quantized_checkpoint_is_refused(base, tmp_path):
    write_checkpoint(base, tmp_path / "awq", "awq", 32)
    with pytest.raises(ValueError, match="already quantized"):
        LLM(str(tmp_path / "awq"), device="cpu", dtype="float32", quantization="int4", quiet=True)


@pytest.mark.parametrize("bits, asymmetric, k, group", [
    (8, False, 80, 80),  # int8: one scale per output channel
    (4, True, 1536, 128),  # int4: groups of 128 where the width allows...
    (4, True, 576, 64),  # ...of 64 (SmolLM2's hidden size)...
    (4, True, 80, 16),  # ...down to 16
    (4, False, 96, 32),  # symmetric 4-bit (GPTQ sym, GGUF Q4_0)
])
def test_round_to_nearest_is_within_half_a_step(bits, asymmetric, k, group):
    from martlet.layers.quantization.packed import PackedFormat, dequantize, quantize
    from martlet.layers.quantization.rtn import int4_group_size

    if bits == 4 and asymmetric:
        assert int4_group_size(k, "layer") == group
    weight = torch.randn(24, k, generator=torch.Generator().manual_seed(k)) * torch.rand(24, 1) * 3
    weight[3] = 0.0  # a row of zeros must survive a zero scale
    fmt = PackedFormat(bits, group, asymmetric)
    qweight, scales, offsets = quantize(weight, fmt, torch.float32)
    error = (dequantize(qweight, scales, offsets, fmt) - weight).abs().view(24, k // group, group).amax(-1)
    assert (error <= scales / 2 * (1 + 1e-5) + 1e-7).all()
    assert torch.equal(dequantize(qweight, scales, offsets, fmt)[3], torch.zeros(k))


def test_int4_refuses_a_width_it_cannot_group():
    with pytest.raises(ValueError, match="layers.0.mlp.down_proj has 100 inputs"):
        from martlet.layers.quantization.rtn import int4_group_size

        int4_group_size(100, "layers.0.mlp.down_proj")
