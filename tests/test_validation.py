"""Bad input is rejected before anything runs, with a clear ValueError, and leaves the engine
working (same outputs as before, no request left, every KV block free). Bad model directories
and engine arguments fail at load time with errors that say what is missing or allowed."""

from __future__ import annotations

import json
import shutil

import pytest

from martlet.llm import LLM
from martlet.sampling_params import MAX_LOGPROBS, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=5)
PROMPT = "Hello, my name is"


@pytest.fixture(scope="module")
def baseline(tiny_llm):
    return tiny_llm.generate(PROMPT, GREEDY, use_tqdm=False)[0].outputs[0].token_ids


@pytest.fixture
def fresh_llm(tiny_model):
    """A private engine for tests that may leave it broken."""
    return LLM(tiny_model, device="cpu", dtype="float32", quiet=True, max_num_seqs=8)


def _rejected(llm, prompts, params, match):
    with pytest.raises(ValueError, match=match):
        llm.generate(prompts, params, use_tqdm=False)


def _still_works(llm, baseline, assert_idle):
    assert_idle(llm)
    assert llm.generate(PROMPT, GREEDY, use_tqdm=False)[0].outputs[0].token_ids == baseline
    assert_idle(llm)


def _vocab(llm) -> int:
    return llm.engine.model_config.vocab_size


BAD_PROMPTS = [
    ("", "empty"),
    ({"prompt_token_ids": []}, "empty"),
    ({"prompt_token_ids": [-1, 5]}, r"\[0, 49152\).*-1"),
    ({"prompt_token_ids": [5, 49152]}, r"\[0, 49152\).*49152"),
    ({"prompt_token_ids": [5, 10**9]}, r"\[0, 49152\)"),
    ({"prompt_token_ids": [5, 6.0]}, "integers"),
    ({"prompt_token_ids": [5, "6"]}, "integers"),
    ({"prompt_token_ids": [None]}, "integers"),
    ({"prompt_token_ids": "abc"}, "integers"),
    ({"prompt_token_ids": 7}, "prompt must be a string or"),
    ({"prompt": "no ids here"}, "prompt must be a string or"),
    ({}, "prompt must be a string or"),
    (5, "prompt must be a string or"),
    (None, "prompt must be a string or"),
    (["nested", "list"], "prompt must be a string or"),
    (b"bytes", "prompt must be a string or"),
]


@pytest.mark.parametrize(("bad", "match"), BAD_PROMPTS, ids=[repr(b)[:30] for b, _ in BAD_PROMPTS])
def test_bad_prompt_is_rejected_and_engine_keeps_working(tiny_llm, baseline, assert_idle, bad, match):
    assert _vocab(tiny_llm) == 49152
    _rejected(tiny_llm, [bad], GREEDY, match)
    # in a batch with good prompts, nothing of the batch runs
    _rejected(tiny_llm, [PROMPT, {"prompt_token_ids": [1, 2]}, bad], GREEDY, match)
    _still_works(tiny_llm, baseline, assert_idle)


def test_prompt_longer_than_max_model_len(tiny_llm, baseline, assert_idle):
    limit = tiny_llm.engine.config.max_model_len
    assert limit == 512
    for n in (limit, limit + 1, 3 * limit):
        _rejected(tiny_llm, [PROMPT, {"prompt_token_ids": [100] * n}], GREEDY, f"{n} tokens.*max_model_len")
    long_text = "word " * (2 * limit)
    _rejected(tiny_llm, long_text, GREEDY, "max_model_len")
    _still_works(tiny_llm, baseline, assert_idle)


def test_prompt_of_max_model_len_minus_one_gets_one_token(tiny_llm, assert_idle):
    limit = tiny_llm.engine.config.max_model_len
    out = tiny_llm.generate({"prompt_token_ids": [100 + i % 50 for i in range(limit - 1)]}, GREEDY,
                            use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 1 and out.outputs[0].finish_reason == "length"
    assert_idle(tiny_llm)


def test_mismatched_number_of_sampling_params(tiny_llm, baseline, assert_idle):
    _rejected(tiny_llm, [PROMPT, PROMPT], [GREEDY] * 3, "2 prompts but 3 sampling params")
    _rejected(tiny_llm, [PROMPT, PROMPT], [GREEDY], "2 prompts but 1 sampling params")
    _rejected(tiny_llm, [PROMPT], [], "1 prompts but 0 sampling params")
    _still_works(tiny_llm, baseline, assert_idle)


def test_one_params_object_or_none_is_shared(tiny_llm, baseline):
    outs = tiny_llm.generate([PROMPT, PROMPT], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [baseline, baseline]
    default = tiny_llm.generate(PROMPT, use_tqdm=False)[0].outputs[0]
    assert len(default.token_ids) == 16  # SamplingParams() default max_tokens
    assert tiny_llm.generate([], GREEDY, use_tqdm=False) == []


# ---- bugs: bad input that gets past validation ---------------------------------------------------


def test_sampling_params_of_the_wrong_type(fresh_llm, baseline, assert_idle):
    with pytest.raises(ValueError, match="SamplingParams"):
        fresh_llm.generate([PROMPT, PROMPT], [GREEDY, {"temperature": 0}], use_tqdm=False)
    _still_works(fresh_llm, baseline, assert_idle)


def test_a_bare_non_prompt_argument(tiny_llm):
    with pytest.raises(ValueError, match="prompt must be a string or"):
        tiny_llm.generate(5, GREEDY, use_tqdm=False)


def test_seed_out_of_range(fresh_llm, baseline, assert_idle):
    with pytest.raises(ValueError, match="seed"):
        fresh_llm.generate([PROMPT, PROMPT], [GREEDY, SamplingParams(seed=2**70)], use_tqdm=False)
    _still_works(fresh_llm, baseline, assert_idle)


def test_logprobs_larger_than_vocab(fresh_llm, baseline, assert_idle):
    with pytest.raises(ValueError, match="logprobs"):
        fresh_llm.generate(PROMPT, SamplingParams(max_tokens=2, logprobs=_vocab(fresh_llm) + 1), use_tqdm=False)
    _still_works(fresh_llm, baseline, assert_idle)


def test_logprobs_at_the_limit_works(tiny_llm, assert_idle):
    out = tiny_llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=1, logprobs=MAX_LOGPROBS),
                            use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs[0]) == MAX_LOGPROBS  # greedy: the sampled token is among the top ones
    assert_idle(tiny_llm)


def test_stop_token_id_outside_vocab_with_min_tokens(fresh_llm, baseline, assert_idle):
    params = SamplingParams(temperature=0.0, max_tokens=5, min_tokens=2, stop_token_ids=[_vocab(fresh_llm) + 10])
    try:
        out = fresh_llm.generate(PROMPT, params, use_tqdm=False)[0].outputs[0]
        assert out.token_ids == baseline  # an id the model cannot produce just never matches
    except ValueError as e:  # ... or it is rejected up front
        assert "stop_token_ids" in str(e)
    _still_works(fresh_llm, baseline, assert_idle)


def test_stop_token_id_outside_vocab_without_min_tokens(tiny_llm, baseline, assert_idle):
    params = SamplingParams(temperature=0.0, max_tokens=5, stop_token_ids=[_vocab(tiny_llm) + 10])
    try:
        out = tiny_llm.generate(PROMPT, params, use_tqdm=False)[0].outputs[0]
        assert out.token_ids == baseline
    except ValueError as e:
        assert "stop_token_ids" in str(e)
    assert_idle(tiny_llm)


# ---- loading -------------------------------------------------------------------------------------


def test_missing_model_directory(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="does not exist") as info:
        LLM(missing, device="cpu")
    assert str(missing) in str(info.value)


def test_directory_without_config(tmp_path, tiny_model):
    for f in tiny_model.iterdir():
        if f.name != "config.json":
            shutil.copy(f, tmp_path / f.name)
    with pytest.raises(FileNotFoundError, match="config.json"):
        LLM(tmp_path, device="cpu")


def test_unknown_architecture(tmp_path, tiny_model):
    shutil.copytree(tiny_model, tmp_path / "m")
    cfg_file = tmp_path / "m" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    cfg["model_type"] = "gpt2"
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="GPT2LMHeadModel") as info:
        LLM(tmp_path / "m", device="cpu")
    assert "LlamaForCausalLM" in str(info.value) and "Qwen2ForCausalLM" in str(info.value)
    cfg.pop("architectures")
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="supports"):
        LLM(tmp_path / "m", device="cpu")


def test_config_without_weights(tmp_path, tiny_model):
    for f in tiny_model.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, tmp_path / f.name)
    with pytest.raises(FileNotFoundError, match=r"\*\.safetensors"):
        LLM(tmp_path, device="cpu")


def test_config_only_directory(tmp_path, tiny_model):
    shutil.copy(tiny_model / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match=r"\*\.safetensors"):
        LLM(tmp_path, device="cpu")
    # ... which is enough for random weights; text needs a tokenizer, token ids do not
    llm = LLM(tmp_path, device="cpu", load_format="dummy", quiet=True, num_kv_blocks=8)
    with pytest.raises(ValueError, match="no tokenizer"):
        llm.generate("text", GREEDY, use_tqdm=False)
    out = llm.generate({"prompt_token_ids": [1, 2, 3]}, GREEDY, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 5 and out.text == ""
    with pytest.raises(ValueError, match="stop needs a tokenizer"):
        llm.generate({"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=5, stop="x"), use_tqdm=False)


def test_sharded_index_with_missing_shard(tmp_path, tiny_model):
    shutil.copytree(tiny_model, tmp_path / "m")
    weights = next((tmp_path / "m").glob("*.safetensors"))
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": weights.name,
                                            "lm_head.weight": "model-00002-of-00002.safetensors"}}
    (tmp_path / "m" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        LLM(tmp_path / "m", device="cpu")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dtype": "float8"}, "dtype"),
        ({"dtype": "int4"}, "dtype"),
        ({"load_format": "pickle"}, "load_format"),
        ({"attention_backend": "magic"}, "attention_backend"),
        ({"max_model_len": 10_000}, "max_model_len"),
        ({"max_model_len": 0}, "max_model_len"),
        ({"max_num_seqs": 0}, "max_num_seqs"),
        ({"max_num_batched_tokens": 0}, "max_num_batched_tokens"),
        ({"block_size": 0}, "block_size"),
        ({"num_kv_blocks": 0}, "num_kv_blocks"),
        ({"gpu_memory_utilization": 0.0}, "gpu_memory_utilization"),
        ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
        ({"num_kv_blocks": 2, "max_model_len": 64}, "KV cache holds 32 tokens"),
    ],
)
def test_bad_engine_arguments(tiny_model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        LLM(tiny_model, device="cpu", quiet=True, **kwargs)


def test_dtype_names_are_accepted(tiny_model):
    for name in ("float32", "bf16"):
        llm = LLM(tiny_model, device="cpu", dtype=name, quiet=True, num_kv_blocks=4, max_model_len=64)
        assert str(llm.engine.config.dtype) == {"float32": "torch.float32", "bf16": "torch.bfloat16"}[name]
