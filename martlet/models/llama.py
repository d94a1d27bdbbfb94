"""The Llama family in one file: Llama 1/2/3, Mistral, Qwen2 (QKV bias) and Qwen3 (QK norm).

They differ only in a few switches of `ModelConfig`. Q, K and V are one merged projection, as
are gate and up: two GEMMs fewer per layer. `load_weights` takes Hugging Face tensor names and
fills the merged weights, so any source that speaks those names (safetensors, GGUF) can feed it.
With tensor parallelism the layers hold one rank's share (`martlet.layers.linear`): the model is
the same, and each layer loads its own share.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from martlet.config import ModelConfig
from martlet.layers.attention import Attention, AttentionBackend, AttentionMetadata
from martlet.layers.linear import (
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    SiluGateUpLinear,
    VocabParallelEmbedding,
    load_weight,
)
from martlet.layers.norm import RMSNorm
from martlet.layers.quantization import QuantizationConfig
from martlet.layers.rotary import RotaryEmbedding


class LlamaAttention(nn.Module):
    def __init__(
        self, cfg: ModelConfig, rotary: RotaryEmbedding, backend: AttentionBackend, quant: QuantizationConfig | None,
        prefix: str,
    ) -> None:
        super().__init__()
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                          cfg.qkv_bias, quant, prefix=f"{prefix}.qkv_proj")
        # This rank's heads: all of them without tensor parallelism.
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.head_dim = cfg.head_dim
        self.q_size = self.num_heads * cfg.head_dim
        self.kv_size = self.num_kv_heads * cfg.head_dim
        self.o_proj = RowParallelLinear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, quant, prefix=f"{prefix}.o_proj")
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm
        self.attn = Attention(self.num_heads, self.num_kv_heads, cfg.head_dim, rotary, backend)

    def rotated_queries(
        self, x: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor, q_out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Project x to q, k and v; rotate q and k; store k and v in the cache. Returns q [T, Hq, D]."""
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return self.attn.rotate_and_store(q, k, v, positions, slot_mapping, q_out)


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, quant: QuantizationConfig | None, prefix: str) -> None:
        super().__init__()
        self.gate_up_proj = SiluGateUpLinear(cfg.hidden_size, 2 * cfg.intermediate_size, quant,
                                             prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, quant, prefix=f"{prefix}.down_proj")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate_up_proj(x))  # gate_up_proj applies SiLU(gate) * up


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self, cfg: ModelConfig, rotary: RotaryEmbedding, backend: AttentionBackend, quant: QuantizationConfig | None,
        prefix: str,
    ) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, rotary, backend, quant, f"{prefix}.self_attn")
        self.mlp = LlamaMLP(cfg, quant, f"{prefix}.mlp")
        # Each norm hands its projection the input form that projection's method asks for (W8A8: 8-bit codes).
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, feeds=self.self_attn.qkv_proj.method)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps,
                                                feeds=self.mlp.gate_up_proj.method)

    def forward(
        self, x: torch.Tensor | None, residual: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """x: the previous layer's output (None in the first layer), which the first norm adds into
        the residual stream, in place. Returns this layer's output.

        The halves either side of attention are separate methods: they depend only on the token
        count, so the model runner can capture them in CUDA graphs and run attention between.
        """
        q = self.before_attention(x, residual, positions, meta.slot_mapping)
        return self.after_attention(self.self_attn.attn.attend(q, meta), residual)

    def before_attention(
        self, x: torch.Tensor | None, residual: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
        q_out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """residual += x, then norm and this layer's rotated queries; its keys and values go to the cache."""
        h = self.input_layernorm(residual) if x is None else self.input_layernorm(x, residual)
        return self.self_attn.rotated_queries(h, positions, slot_mapping, q_out)

    def after_attention(self, attn_out: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual += o_proj(attention), then the MLP of its norm: this layer's output."""
        x = self.self_attn.o_proj(attn_out.flatten(1))
        return self.mlp(self.post_attention_layernorm(x, residual))


class LlamaForCausalLM(nn.Module):
    def __init__(
        self, cfg: ModelConfig, backend: AttentionBackend, max_positions: int, quant: QuantizationConfig | None = None
    ) -> None:
        """`quant` is the weight format of the decoder layers' linear layers; the embedding and the LM
        head stay in the model's dtype."""
        super().__init__()
        self.config = cfg
        rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling)
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(cfg, rotary, backend, quant, f"layers.{i}") for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = ParallelLMHead(cfg.hidden_size, cfg.vocab_size)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """Hidden states [T, hidden] of the flat batch, after the final norm."""
        # The residual stream is one tensor, which each norm adds the layer output before it into.
        residual, x = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x = layer(x, residual, positions, meta)
        return self.norm(x, residual)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.layers]

    # Hugging Face names of the pieces that live inside a merged weight: (merged, shard index).
    _MERGED = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face-named tensors in; raise if any parameter was left unfilled."""
        params = dict(self.named_parameters())
        filled: set[str] = set()
        for hf_name, tensor in weights:
            name = hf_name.removeprefix("model.")
            if "rotary_emb" in name:
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            parts = name.split(".")
            merged = self._MERGED.get(parts[-2]) if len(parts) >= 2 else None
            if merged is None:
                if name not in params:
                    raise ValueError(f"weight {hf_name!r} has no place in {self.config.architecture}")
                getattr(params[name], "weight_loader", load_weight)(params[name], tensor, hf_name)
                filled.add(name)
                continue
            merged_name, shard = merged
            target = ".".join(parts[:-2] + [merged_name, parts[-1]])
            params[target].weight_loader(params[target], tensor, hf_name, shard)
            filled.add(f"{target}#{shard}")
        self._check_filled(params, filled)

    def _check_filled(self, params: dict[str, nn.Parameter], filled: set[str]) -> None:
        missing = []
        for name, param in params.items():
            if getattr(param, "optional", False):  # e.g. W8A8's pre_quant_scale: ones unless the checkpoint has it
                continue
            num_shards = sum(merged == name.split(".")[-2] for merged, _ in self._MERGED.values())
            keys = [f"{name}#{i}" for i in range(num_shards)] if num_shards else [name]
            missing += [key for key in keys if key not in filled]
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} weights, e.g. {missing[:3]}")
