"""Find a model on disk, build it, and fill its weights.

Two formats: a Hugging Face directory (`config.json`, one or many `*.safetensors`, tokenizer
files) or a single GGUF file (llama.cpp's format, which carries config and tokenizer inside).
`load_format="dummy"` builds the model from its config alone with random weights.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from martlet.config import ModelConfig
from martlet.layers.attention import AttentionBackend
from martlet.models.llama import LlamaForCausalLM

LOAD_FORMATS = ("auto", "safetensors", "dummy")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


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


def build_model(
    path: str | Path, cfg: ModelConfig, backend: AttentionBackend, *, dtype: torch.dtype,
    device: torch.device, max_positions: int, load_format: str, quiet: bool = False,
) -> LlamaForCausalLM:
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {load_format!r}")
    with torch.device(device):
        model = LlamaForCausalLM(cfg, backend, max_positions)
    model.to(dtype)
    for layer in model.attention_layers():  # rotary tables stay fp32
        layer.rotary.float()
    if load_format == "dummy":
        _fill_dummy(model)
    elif is_gguf(path):
        from martlet.models import gguf

        model.load_weights(gguf.iter_weights(Path(path), quiet=quiet))
    else:
        model.load_weights(iter_safetensors(Path(path), quiet=quiet))
    return model.eval().requires_grad_(False)  # serving only: no autograd bookkeeping anywhere


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


def iter_safetensors(path: Path, quiet: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    for file in tqdm(safetensors_files(path), desc="Loading safetensors", unit="file", disable=quiet):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


@torch.no_grad()
def _fill_dummy(model: torch.nn.Module) -> None:
    """Small uniform weights (norms at 1): activations stay finite through any depth."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(0)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        else:
            param.uniform_(-0.02, 0.02, generator=gen)
