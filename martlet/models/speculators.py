"""The small models speculative decoding guesses with, on top of the target: Medusa heads and EAGLE.

Medusa (FasterDecoding/Medusa's checkpoint format): head i maps the target's last hidden state
(after its final norm) at position t to logits for token t + 2 + i, through `medusa_num_layers`
residual blocks x + SiLU(W x + b) and an LM head of its own. The directory holds a config.json with
`medusa_num_heads` and `medusa_num_layers`, and `medusa_lm_head.safetensors` (or `.pt`) with
`{i}.{j}.linear.weight/bias` and `{i}.{medusa_num_layers}.weight`. vLLM's format (config.json with
"architectures": ["MedusaModel"]) is not read.

EAGLE (EAGLE-1's checkpoint: a Llama config.json and `fc.weight` (2h -> h, bias optional) plus
`layers.{i}.*` Llama decoder layers, as safetensors or pytorch_model.bin): position t's input is the
embedding of token t + 1 next to the target's hidden state at t, projected by fc; the first layer has
no input norm and the last has no final norm after it; the target's embedding and LM head are used.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from martlet.config import ModelConfig
from martlet.layers.attention import AttentionBackend, AttentionMetadata
from martlet.models.llama import LlamaForCausalLM
from martlet.models.loader import _fill_dummy, iter_safetensors

MEDUSA_WEIGHTS = ("medusa_lm_head.safetensors", "medusa_lm_head.pt")


class MedusaHeads(nn.Module):
    def __init__(self, num_heads: int, num_layers: int, hidden_size: int, vocab_size: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleList(nn.Linear(hidden_size, hidden_size) for _ in range(num_layers))
                                    for _ in range(num_heads))
        self.lm_heads = nn.ModuleList(nn.Linear(hidden_size, vocab_size, bias=False) for _ in range(num_heads))

    def forward(self, hidden: torch.Tensor, top_k: int = 1) -> torch.Tensor:
        """Each head's `top_k` likeliest tokens [rows, num_heads, top_k] after the hidden states [rows, hidden]."""
        tokens = []
        for blocks, lm_head in zip(self.blocks, self.lm_heads):
            x = hidden
            for block in blocks:
                x = x + nn.functional.silu(block(x))
            logits = lm_head(x)
            tokens.append(logits.argmax(dim=-1, keepdim=True) if top_k == 1 else logits.topk(top_k).indices)
        return torch.stack(tokens, dim=1)


def load_medusa_heads(path: str | Path, target: ModelConfig, num_heads: int, dtype: torch.dtype,
                      device: torch.device) -> MedusaHeads:
    """The first `num_heads` heads of a FasterDecoding/Medusa checkpoint, for `target`."""
    path = Path(path)
    config_file = path / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    weights_file = next((path / name for name in MEDUSA_WEIGHTS if (path / name).is_file()), None)
    if "medusa_num_heads" not in config or weights_file is None:
        vllm = "MedusaModel" in (config.get("architectures") or [])
        vllm = " (vLLM's MedusaModel format is not read)" if vllm else ""
        raise ValueError(f"{path} is not a Medusa checkpoint in FasterDecoding/Medusa's format{vllm}: expected a "
                         f"config.json with medusa_num_heads and one of {', '.join(MEDUSA_WEIGHTS)}")
    if num_heads > config["medusa_num_heads"]:
        raise ValueError(f"speculative_config: num_speculative_tokens={num_heads}, but {path} has only "
                         f"{config['medusa_num_heads']} Medusa heads")
    num_layers = config.get("medusa_num_layers", 1)
    if weights_file.suffix == ".pt":
        weights = torch.load(weights_file, map_location="cpu", weights_only=True)
    else:
        weights = load_file(weights_file)
    lm_head = weights["0." + str(num_layers) + ".weight"]
    if tuple(lm_head.shape) != (target.vocab_size, target.hidden_size):
        raise ValueError(f"the Medusa heads in {path} map {lm_head.shape[1]} hidden units to {lm_head.shape[0]} "
                         f"tokens; the target has {target.hidden_size} and {target.vocab_size}")
    state = {}
    for i in range(num_heads):
        for j in range(num_layers):
            for kind in ("weight", "bias"):
                state[f"blocks.{i}.{j}.{kind}"] = weights[f"{i}.{j}.linear.{kind}"]
        state[f"lm_heads.{i}.weight"] = weights[f"{i}.{num_layers}.weight"]
    with torch.device(device):
        heads = MedusaHeads(num_heads, num_layers, target.hidden_size, target.vocab_size)
    heads.load_state_dict(state)
    return heads.to(dtype).eval().requires_grad_(False)


class EagleModel(LlamaForCausalLM):
    """EAGLE-1's draft: Llama decoder layers over fc([embedding of the next token, target hidden
    state]); its K/V go to a KV pool like a draft model's."""

    def __init__(self, cfg: ModelConfig, target: LlamaForCausalLM, backend: AttentionBackend, max_positions: int,
                 fc_bias: bool) -> None:
        super().__init__(cfg, backend, max_positions)
        del self.embed_tokens, self.norm, self.lm_head  # the target's embedding and LM head serve; no final norm
        self.layers[0].input_layernorm = nn.Identity()
        self.fc = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=fc_bias)
        self.target = [target]  # in a list: not a submodule, its weights are not this model's

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                features: torch.Tensor) -> torch.Tensor:
        """Hidden states [T, hidden]: position t's guess of the target's hidden state at t + 1, from
        `input_ids` (token t + 1) and `features` (the target's hidden state at t, or a guess of it)."""
        residual = self.fc(torch.cat([self.target[0].embed_tokens(input_ids), features], dim=-1))
        x = None
        for layer in self.layers:
            x = layer(x, residual, positions, meta)
        return residual + x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.target[0].lm_head(hidden)


def load_eagle(path: str | Path, target: LlamaForCausalLM, backend: AttentionBackend, *, dtype: torch.dtype,
               device: torch.device, max_positions: int, load_format: str) -> EagleModel:
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} has no config.json; expected an EAGLE-1 checkpoint directory")
    cfg = ModelConfig.from_dict({**json.loads(config_file.read_text()), "architectures": ["LlamaForCausalLM"]})
    if cfg.hidden_size != target.config.hidden_size:
        raise ValueError(f"the EAGLE model in {path} has hidden size {cfg.hidden_size}; the target "
                         f"{target.config.hidden_size}")
    weights = {} if load_format == "dummy" else dict(_eagle_weights(path))
    with torch.device(device):
        model = EagleModel(cfg, target, backend, max_positions, fc_bias=load_format == "dummy" or "fc.bias" in weights)
    model.to(dtype)
    for layer in model.attention_layers():  # rotary tables stay fp32
        layer.rotary.float()
    if load_format == "dummy":
        _fill_dummy(model)
    else:  # the target's embedding serves, whether or not the checkpoint has a copy
        model.load_weights((name, t) for name, t in weights.items() if "embed_tokens" not in name)
    return model.eval().requires_grad_(False)


def _eagle_weights(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    if any(path.glob("*.safetensors")):
        yield from iter_safetensors(path, quiet=True)
    elif (path / "pytorch_model.bin").is_file():
        yield from torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True).items()
    else:
        raise FileNotFoundError(f"no *.safetensors or pytorch_model.bin in {path}")
