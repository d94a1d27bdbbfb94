"""Find a model on disk, build it, and fill its weights.

Two formats: a Hugging Face directory (`config.json`, one or many `*.safetensors`, tokenizer
files) or a single GGUF file (llama.cpp's format, which carries config and tokenizer inside).
`load_format="dummy"` builds the model from its config alone with random weights.

The weight format (`martlet.layers.quantization`) comes from the checkpoint's `quantization_config`
(GPTQ, AWQ) or from `quantization="int8" | "int4"` (quantized here, at load); each linear layer
repacks its weights once all are loaded.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from martlet import distributed
from martlet.config import EngineConfig, ModelConfig
from martlet.layers.attention import AttentionBackend
from martlet.layers.linear import Linear
from martlet.layers.norm import RMSNorm
from martlet.layers.quantization import QuantizationConfig, from_checkpoint, from_name
from martlet.models.llama import LlamaForCausalLM

logger = logging.getLogger("martlet")

LOAD_FORMATS = ("auto", "safetensors", "dummy")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
# Device types on which a GGUF file's quantized blocks stay packed. On a CPU the reference path would
# dequantize every block at every step, so there they are dequantized once, at load.
GGUF_PACKED_DEVICES = ("cuda",)


def is_gguf(path: str | Path) -> bool:
    return str(path).endswith(".gguf")


def read_model_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"model path {str(path)!r} does not exist; pass a Hugging Face model directory "
            "(config.json + *.safetensors) or a .gguf file"
        )
    if is_gguf(path):
        from martlet.models import gguf  # the gguf package is needed for GGUF files only

        return ModelConfig.from_dict(gguf.read_config(path))
    return ModelConfig.from_dir(path)


def load_tokenizer(path: str | Path):
    """The model's tokenizer (and chat template) from local files only."""
    from transformers import AutoTokenizer

    path = Path(path)
    if is_gguf(path):
        from martlet.models import gguf

        return gguf.load_tokenizer(path)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"no tokenizer in {path}: expected one of {', '.join(TOKENIZER_FILES)}")
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def quantization_config(
    path: str | Path, quantization: str | None, load_format: str, device: torch.device
) -> QuantizationConfig | None:
    """The weight format: `quantization` if asked (quantized at load), else the checkpoint's own,
    if it has one: GPTQ / AWQ from config.json, or a GGUF file's blocks on GGUF_PACKED_DEVICES.
    None: the model's dtype."""
    if is_gguf(path):
        if quantization is not None or device.type not in GGUF_PACKED_DEVICES or load_format == "dummy":
            return None if quantization is None else from_name(quantization)
        from martlet.models import gguf

        formats = gguf.packed_formats(Path(path))
        return gguf.GGUFPackedConfig(formats) if formats else None
    config_file = Path(path) / "config.json"
    checkpoint = json.loads(config_file.read_text()).get("quantization_config") if config_file.is_file() else None
    if checkpoint is None:
        return None if quantization is None else from_name(quantization)
    if quantization is not None:
        raise ValueError(f"{path} is already quantized ({checkpoint.get('quant_method')}); leave quantization unset")
    if distributed.tp_size() > 1 and checkpoint.get("quant_method") in ("gptq", "awq"):
        raise ValueError(f"{checkpoint.get('quant_method')} checkpoints do not run with tensor_parallel_size > 1 yet; "
                         "quantization='int4' quantizes at load and does")
    if load_format == "dummy":
        raise ValueError("load_format='dummy' cannot fill a pre-quantized checkpoint's packed weights; "
                         "quantization='int4' runs the same kernels on random weights")
    return from_checkpoint(checkpoint)


def build_engine_model(config: EngineConfig, model_config: ModelConfig, quiet: bool = False) -> LlamaForCausalLM:
    """The engine's model as `config` asks for it (this rank's share with tensor parallelism): the
    driver and every worker build it the same way."""
    from martlet.layers.backends import get_attention_backend

    return build_model(config.model, model_config, get_attention_backend(config.attention_backend),
                       dtype=config.dtype, device=config.device, max_positions=config.max_model_len,
                       load_format=config.load_format, quantization=config.quantization, quiet=quiet)


def build_model(
    path: str | Path, cfg: ModelConfig, backend: AttentionBackend, *, dtype: torch.dtype,
    device: torch.device, max_positions: int, load_format: str, quantization: str | None = None,
    quiet: bool = False,
) -> LlamaForCausalLM:
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {load_format!r}")
    quant = quantization_config(path, quantization, load_format, torch.device(device))
    with torch.device(device):
        model = LlamaForCausalLM(cfg, backend, max_positions, quant)
    model.to(dtype)
    for layer in model.attention_layers():  # rotary tables stay fp32
        layer.rotary.float()
    if load_format == "dummy":
        _fill_dummy(model)
    elif is_gguf(path):
        from martlet.models import gguf

        packed = quant.formats if isinstance(quant, gguf.GGUFPackedConfig) else None
        model.load_weights(gguf.iter_weights(Path(path), quiet=quiet, packed=packed, lazy=distributed.tp_size() > 1))
    else:
        model.load_weights(iter_safetensors(Path(path), quiet=quiet, lazy=distributed.tp_size() > 1))
    if quant is not None:
        _repack(model, quant, quiet)
    if not quiet:
        size = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
        logger.info("Weights (%s): %.2f GiB", quant.name if quant else str(dtype).removeprefix("torch."), size / 2**30)
    return model.eval().requires_grad_(False)  # serving only: no autograd bookkeeping anywhere


def _repack(model: LlamaForCausalLM, quant: QuantizationConfig, quiet: bool) -> None:
    """Each linear layer's weights into its format's kernel layout (quantizing them for int8/int4), after
    each norm has folded in the smoothing factors of the layer it feeds (SmoothQuant, W8A8)."""
    for norm in model.modules():
        if isinstance(norm, RMSNorm):
            norm.fold_input_smoothing()
    layers = [module for module in model.modules() if isinstance(module, Linear)]
    for layer in tqdm(layers, desc=f"Packing weights ({quant.name})", unit="layer", disable=quiet):
        layer.method.process_weights_after_loading(layer)
    if next(model.parameters()).is_cuda:  # the full-precision weights just freed go back to the GPU
        torch.cuda.empty_cache()


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [path / name for name in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists weight files that are not there: {missing}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no *.safetensors weight files in {path}; use load_format='dummy' for random weights"
        )
    return files


def iter_safetensors(path: Path, quiet: bool = False, lazy: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor; `lazy`: as a slice that reads only the part indexed (a tensor-parallel rank's share)."""
    for file in tqdm(safetensors_files(path), desc="Loading safetensors", unit="file", disable=quiet):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_slice(name) if lazy else f.get_tensor(name)


@torch.no_grad()
def _fill_dummy(model: torch.nn.Module) -> None:
    """Small uniform weights (norms at 1): activations stay finite through any depth."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(0)
    for name, param in model.named_parameters():
        if getattr(param, "optional", False):  # left as created (W8A8's pre_quant_scale: ones)
            continue
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        else:
            param.uniform_(-0.02, 0.02, generator=gen)
