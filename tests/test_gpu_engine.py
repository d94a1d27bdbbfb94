"""The engine on a GPU: Triton kernels and CUDA graphs against the CPU reference path.

The ladder and padding logic of the graphs is plain Python and is tested everywhere.
"""

from __future__ import annotations

import importlib
import pkgutil
import random

import pytest
import torch

from martlet import LLM, SamplingParams
from martlet.engine.cuda_graphs import capture_plan, padded_batch_size, size_ladder
from martlet.kernels.decode import decode_num_splits
from martlet.testing import make_tiny_model

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_size_ladder():
    assert size_ladder(1) == [1]
    assert size_ladder(3) == [1, 2, 4]
    assert size_ladder(8) == [1, 2, 4, 8]
    assert size_ladder(20) == [1, 2, 4, 8, 16, 24]
    ladder = size_ladder(256)
    assert ladder[:5] == [1, 2, 4, 8, 16] and ladder[-1] == 256
    assert all(b - a == 8 for a, b in zip(ladder[3:], ladder[4:]))
    ladder = size_ladder(1000)  # beyond 256, steps of 16 up to 512, then 32
    assert ladder[ladder.index(256):ladder.index(256) + 3] == [256, 272, 288]
    assert ladder[ladder.index(512):] == [512, *range(544, 1024 + 1, 32)]


def test_padded_batch_size():
    ladder = size_ladder(256)
    assert [padded_batch_size(ladder, b) for b in (1, 2, 3, 5, 8, 9, 17, 255, 256)] == [
        1, 2, 4, 8, 8, 16, 24, 256, 256]
    assert padded_batch_size(ladder, 257) is None


@pytest.mark.parametrize("num_kv_heads, max_model_len", [(32, 2304), (8, 8192), (2, 1000)])
def test_capture_plan_covers_every_key_a_step_can_ask_for(num_kv_heads, max_model_len):
    ladder = size_ladder(256)

    def key(rung: int, longest: int) -> tuple[int, int]:
        return rung, decode_num_splits(rung, num_kv_heads, longest, torch.device("cpu"))

    plan = capture_plan(ladder, max_model_len, key)
    planned = [key(*p) for p in plan]
    assert len(set(planned)) == len(planned), "a graph would be captured twice"
    needed = {key(rung, n) for rung in ladder for n in range(1, max_model_len + 1)}
    assert set(planned) == needed
    assert [rung for rung, _ in plan] == sorted((rung for rung, _ in plan), reverse=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("gpu-tiny"), "llama", with_tokenizer=False)
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(4096) for _ in range(n)]}
               for n in (1, 3, 15, 16, 17, 33, 64, 100, 5, 9, 47, 80)]
    return str(path), prompts


def greedy_tokens(path: str, prompts: list[dict], **kwargs) -> list[list[int]]:
    # A fixed pool: engines of earlier tests may still hold GPU memory a profiled pool would count.
    llm = LLM(path, quiet=True, **{"num_kv_blocks": 256, **kwargs})
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks
    return [o.outputs[0].token_ids for o in outs]


@needs_gpu
@pytest.mark.gpu
def test_triton_and_graphs_match_cpu_reference_fp32(tiny):
    path, prompts = tiny
    expected = greedy_tokens(path, prompts, device="cpu", dtype="float32")
    assert greedy_tokens(path, prompts, device="cuda", dtype="float32") == expected
    # A pool too small for the batch: preemption and recompute on the GPU path too.
    assert greedy_tokens(path, prompts, device="cuda", dtype="float32", num_kv_blocks=12) == expected


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_graphs_match_eager(tiny, dtype):
    path, prompts = tiny
    eager = greedy_tokens(path, prompts, device="cuda", dtype=dtype, enforce_eager=True)
    assert greedy_tokens(path, prompts, device="cuda", dtype=dtype) == eager


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("kv_cache_dtype", ["int8", "fp8"])
def test_8bit_kv_cache_on_the_gpu(tiny, kv_cache_dtype):
    """CUDA graphs (full and piecewise) over an 8-bit cache give eager's tokens; in fp32 the GPU gives
    the CPU reference's, preempted or not."""
    path, prompts = tiny
    eager = greedy_tokens(path, prompts, device="cuda", dtype="float16", enforce_eager=True,
                          kv_cache_dtype=kv_cache_dtype)
    assert greedy_tokens(path, prompts, device="cuda", dtype="float16", kv_cache_dtype=kv_cache_dtype) == eager
    expected = greedy_tokens(path, prompts, device="cpu", dtype="float32", kv_cache_dtype=kv_cache_dtype)
    for num_kv_blocks, block_size in ((256, None), (12, 16)):  # the small pool preempts
        assert greedy_tokens(path, prompts, device="cuda", dtype="float32", kv_cache_dtype=kv_cache_dtype,
                             num_kv_blocks=num_kv_blocks, block_size=block_size) == expected


def compiled_kernel_variants() -> dict[str, int]:
    """How many variants Triton has compiled of each of our kernels so far."""
    import triton

    import martlet.kernels as kernels

    counts = {}
    for module in pkgutil.iter_modules(kernels.__path__):
        for name, fn in vars(importlib.import_module(f"martlet.kernels.{module.name}")).items():
            if isinstance(fn, triton.runtime.jit.JITFunction):
                counts[name] = sum(len(cache[0]) for cache in fn.device_caches.values())
    return counts


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_no_kernel_compiles_after_start(tiny, kv_cache_dtype):
    """Serving must not stall on a compile: requests of any length, alone or joining a running batch
    (mixed steps), use only kernel variants built while the engine started."""
    path, _ = tiny
    llm = LLM(path, quiet=True, device="cuda", dtype="float16", num_kv_blocks=256, kv_cache_dtype=kv_cache_dtype)
    engine = llm.engine
    compiled = compiled_kernel_variants()
    assert compiled.get("_decode_kernel") and compiled.get("_skinny_linear_kernel"), "start built no kernels to compare"
    rng = random.Random(1)
    for i, n in enumerate([1, 2, 9, 16, 17, 33, 100, 130]):
        engine.add_request([rng.randrange(4096) for _ in range(n)], SamplingParams(max_tokens=4), request_id=f"a{i}")
        while engine.has_unfinished_requests():
            engine.step()
    for burst in (2, 3, 6, 20):
        for j in range(burst):  # one arrival per step: prefills mix with the running decodes
            n = rng.randrange(1, 150)
            engine.add_request([rng.randrange(4096) for _ in range(n)], SamplingParams(max_tokens=30),
                               request_id=f"b{burst}-{j}")
            engine.step()
        while engine.has_unfinished_requests():
            engine.step()
    assert compiled_kernel_variants() == compiled
