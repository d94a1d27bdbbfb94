"""W8A8 (fp8, w8a8): the CPU reference's arithmetic, FP8 checkpoints, and a clear error where FP8 can't run."""

import json
import random

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from martlet import LLM, SamplingParams
from martlet.layers.activation import silu_and_mul
from martlet.layers.kv_cache import KV_FORMATS, dequantize, quantize
from martlet.layers.linear import Linear, SiluGateUpLinear
from martlet.layers.norm import RMSNorm, rms_norm
from martlet.layers.quantization import from_name
from martlet.layers.quantization.w8a8 import SKINNY_MAX_TOKENS, QuantizedRows, check_device
from martlet.testing import make_tiny_model

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize("name", ["fp8", "w8a8"])
def test_linear_multiplies_the_codes_it_stores(name):
    """y = (x codes * token scales) @ (weight codes * channel scales)^T + bias, on both 8-bit grids."""
    gen = torch.Generator().manual_seed(0)
    layer = Linear(96, 40, bias=True, quant=from_name(name))
    weight = torch.randn(40, 96, generator=gen)
    layer.weight.data.copy_(weight)
    layer.bias.data.copy_(torch.randn(40, generator=gen))
    layer.method.process_weights_after_loading(layer)
    fmt = KV_FORMATS["fp8" if name == "fp8" else "int8"]
    assert layer.weight_codes.dtype == fmt.dtype and not hasattr(layer, "weight")
    x = torch.randn(3, 5, 96, generator=gen)
    codes, scales = quantize(x.reshape(-1, 96), fmt, torch.float32)
    expected = dequantize(codes, scales) @ dequantize(*quantize(weight, fmt, torch.float32)).T + layer.bias
    torch.testing.assert_close(layer(x), expected.reshape(3, 5, 40))
    assert (layer(x) - x @ weight.T - layer.bias).norm() < 0.05 * (x @ weight.T).norm()


def test_fp8_needs_fp8_tensor_cores(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(ValueError, match=r"compute capability 8.9 or newer.*A100 has 8.0"):
        check_device(KV_FORMATS["fp8"], torch.device("cuda"))
    check_device(KV_FORMATS["int8"], torch.device("cuda"))  # int8 tensor cores are older


def _fp8_checkpoint(src, dst, per_tensor: bool) -> None:
    """Rewrite a tiny model as an FP8 checkpoint (vLLM's layout): e4m3 weights and their weight_scale."""
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    tensors = load_file(src / "model.safetensors")
    for name in [n for n in tensors if n.split(".")[-2] in PROJECTIONS]:
        weight = tensors[name].float()
        if per_tensor:
            scale = weight.abs().max() / 448
            codes = (weight / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
        else:
            codes, scale = quantize(weight, KV_FORMATS["fp8"], torch.float32)
        tensors[name] = codes
        tensors[name.removesuffix("weight") + "weight_scale"] = scale.reshape(-1, 1) if scale.dim() else scale
    save_file(tensors, dst / "model.safetensors")
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    (dst / "config.json").write_text(json.dumps(config))


def test_fp8_checkpoints_load_as_they_are(tmp_path):
    src = make_tiny_model(tmp_path / "tiny", "llama", with_tokenizer=False)
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(4096) for _ in range(n)]} for n in (3, 17, 40)]
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)

    def run(path, **kwargs):
        llm = LLM(str(path), device="cpu", dtype="float32", quiet=True, **kwargs)
        return llm, [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]

    # Per-channel scales as our own quantizer makes them: the same codes, so the same tokens.
    _fp8_checkpoint(src, tmp_path / "per_channel", per_tensor=False)
    _, at_load = run(src, quantization="fp8")
    _, loaded = run(tmp_path / "per_channel")
    assert loaded == at_load

    # One scale per tensor: each shard of a merged layer keeps its own.
    _fp8_checkpoint(src, tmp_path / "per_tensor", per_tensor=True)
    llm, _ = run(tmp_path / "per_tensor")
    file = load_file(tmp_path / "per_tensor" / "model.safetensors")
    qkv = llm.engine.runner.model.layers[0].self_attn.qkv_proj
    q_rows = file["model.layers.0.self_attn.q_proj.weight"].shape[0]
    k_rows = file["model.layers.0.self_attn.k_proj.weight"].shape[0]
    assert torch.equal(qkv.weight_codes[:q_rows].float(), file["model.layers.0.self_attn.q_proj.weight"].float())
    shards = {"q": slice(0, q_rows), "k": slice(q_rows, q_rows + k_rows), "v": slice(q_rows + k_rows, None)}
    for shard, rows in shards.items():  # each shard's rows take its own per-tensor scale
        assert (qkv.weight_scale[0, rows] == file[f"model.layers.0.self_attn.{shard}_proj.weight_scale"]).all()

    with pytest.raises(ValueError, match="leave quantization unset"):
        run(tmp_path / "per_tensor", quantization="fp8")


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["fp8", "w8a8"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tensor_cores_match_the_reference(name, dtype):
    """`torch._scaled_mm` / `torch._int_mm` and the Triton activation codes against the CPU reference;
    up to SKINNY_MAX_TOKENS the GPU quantizes no activations, so there the reference is weight-only."""
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(384, 512, generator=gen), torch.randn(384, generator=gen)
    layers = {}
    for device in ("cpu", "cuda"):
        layer = Linear(512, 384, bias=True, quant=from_name(name))
        layer.weight.data.copy_(weight)
        layer.bias.data.copy_(bias)
        layer = layer.to(device) if device == "cpu" else layer.to(device, dtype)
        layer.method.process_weights_after_loading(layer)
        layers[device] = layer
    for rows in (1, 5, 64, 300):
        x = torch.randn(rows, 512, generator=gen)
        out = layers["cuda"](x.to("cuda", dtype)).float().cpu()
        cpu = layers["cpu"]
        if rows <= SKINNY_MAX_TOKENS:
            ref = F.linear(x.to(dtype).float(), dequantize(cpu.weight_codes, cpu.weight_scale[0]), cpu.bias)
        else:
            ref = cpu(x.to(dtype).float())
        assert ((out - ref).norm() / ref.norm()).item() < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["fp8", "w8a8"])
def test_graphs_match_eager_gpu(name, tmp_path):
    path = make_tiny_model(tmp_path / "tiny", "llama", with_tokenizer=False)
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(4096) for _ in range(n)]} for n in (1, 9, 40, 100)]
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    outs = []
    for eager in (True, False):
        llm = LLM(str(path), device="cuda", dtype="float16", quantization=name, num_kv_blocks=128, quiet=True,
                  enforce_eager=eager, kv_cache_dtype="fp8")
        outs.append([o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)])
    assert outs[0] == outs[1]


@pytest.mark.parametrize("name", ["fp8", "w8a8"])
def test_norm_and_silu_quantize_for_the_projection_they_feed(name):
    """The RMSNorm before a W8A8 projection and the gated MLP's SiLU*mul hand it per-token codes
    (`QuantizedRows`); the products are those of quantizing their outputs in `apply`."""
    gen = torch.Generator().manual_seed(0)
    quant = from_name(name)
    gate_up, down = SiluGateUpLinear(96, 2 * 40, quant=quant), Linear(40, 96, bias=False, quant=quant)
    for layer in (gate_up, down):
        layer.weight.data.copy_(torch.randn(layer.weight.shape, generator=gen))
        layer.method.process_weights_after_loading(layer)
    norm = RMSNorm(96, 1e-6, feeds=gate_up.method)
    norm.weight.data.copy_(1 + 0.1 * torch.randn(96, generator=gen))
    x, residual = torch.randn(7, 96, generator=gen), torch.randn(7, 96, generator=gen)
    h, summed = norm(x, residual.clone()), residual + x
    assert isinstance(h, QuantizedRows)
    hidden = gate_up(h)
    assert isinstance(hidden, QuantizedRows)
    expected_hidden = silu_and_mul(gate_up.method.apply(gate_up, rms_norm(summed, norm.weight, 1e-6)))
    torch.testing.assert_close(down(hidden), down(expected_hidden))


SMOOTHED = [("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
            (None, ("self_attn.o_proj",)), (None, ("mlp.down_proj",))]


def _outlier_checkpoint(src, dst, outlier: float, smoothed: bool) -> None:
    """`src` with SmoothQuant's trouble and its cure: three channels of each norm's output `outlier`
    times larger (the norm's weight scaled, the columns of the layers it feeds scaled back: the same
    model); `smoothed`, with ModelOpt's `pre_quant_scale` p for every layer (1 / outlier there, random
    elsewhere), its weight's columns divided by p: again the same model."""
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    tensors = load_file(src / "model.safetensors")
    gen = torch.Generator().manual_seed(1)
    for i in range(json.loads((src / "config.json").read_text())["num_hidden_layers"]):
        for norm, projections in SMOOTHED:
            width = tensors[f"model.layers.{i}.{projections[0]}.weight"].shape[1]
            smoothing, boost = torch.exp(0.5 * torch.randn(width, generator=gen)), torch.ones(width)
            if norm is not None:
                boost[:3], smoothing[:3] = outlier, 1 / outlier
                tensors[f"model.layers.{i}.{norm}.weight"] *= boost
            for name in projections:
                tensors[f"model.layers.{i}.{name}.weight"] /= boost * smoothing if smoothed else boost
                if smoothed:
                    tensors[f"model.layers.{i}.{name}.pre_quant_scale"] = smoothing.clone()
    save_file(tensors, dst / "model.safetensors")


def test_smoothquant_factors_fold_into_the_norms(tmp_path):
    """Outlier channels ruin W8A8's per-token activation codes; a checkpoint with `pre_quant_scale`
    smoothing them away (folded into the norms) is as close to the unquantized model as the model
    without outliers, which loads as before without the tensors."""
    from quality import next_token_logits

    src = make_tiny_model(tmp_path / "tiny", "llama", with_tokenizer=False)
    _outlier_checkpoint(src, tmp_path / "outliers", outlier=100.0, smoothed=False)
    _outlier_checkpoint(src, tmp_path / "smoothed", outlier=100.0, smoothed=True)
    ids = [random.Random(0).randrange(4096) for _ in range(48)]

    def logits(path, **kwargs):
        llm = LLM(str(path), device="cpu", dtype="float32", quiet=True, **kwargs)
        return llm, next_token_logits(llm, ids)

    _, exact = logits(src)
    _, plain = logits(src, quantization="w8a8")
    _, outliers = logits(tmp_path / "outliers", quantization="w8a8")
    llm, smoothed = logits(tmp_path / "smoothed", quantization="w8a8")
    file = load_file(tmp_path / "smoothed" / "model.safetensors")
    folded = file["model.layers.0.input_layernorm.weight"] * file["model.layers.0.self_attn.q_proj.pre_quant_scale"]
    assert torch.allclose(llm.engine.runner.model.layers[0].input_layernorm.weight, folded)
    error = lambda out: ((out - exact).norm() / exact.norm()).item()  # noqa: E731
    assert error(smoothed) < 1.5 * error(plain) < 0.1  # measured: 2.9% and 2.2%
    assert error(outliers) > 0.3  # 50%


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["fp8", "w8a8"])
def test_gpu_model_matches_cpu_reference(name, tmp_path):
    """A 48-token prefill on the GPU (codes from the fused norm and SiLU*mul kernels, tensor cores),
    SmoothQuant factors folded, against the CPU reference's logits."""
    from quality import next_token_logits

    src = make_tiny_model(tmp_path / "tiny", "llama", with_tokenizer=False)
    _outlier_checkpoint(src, tmp_path / "smoothed", outlier=100.0, smoothed=True)
    ids = [random.Random(0).randrange(4096) for _ in range(48)]
    cpu = LLM(str(tmp_path / "smoothed"), device="cpu", dtype="float32", quantization=name, quiet=True)
    gpu = LLM(str(tmp_path / "smoothed"), device="cuda", dtype="float16", quantization=name, num_kv_blocks=64,
              quiet=True)
    ref, out = next_token_logits(cpu, ids), next_token_logits(gpu, ids).float().cpu()
    assert ((out - ref).norm() / ref.norm()).item() < 5e-2
