"""The engine on a GPU: Triton kernels and CUDA graphs against the CPU reference path.

The ladder and padding logic of the decode graphs is plain Python and is tested everywhere.
"""

from __future__ import annotations

import random

import pytest
import torch

from martlet import LLM, SamplingParams
from martlet.engine.cuda_graphs import batch_size_ladder, padded_batch_size
from martlet.testing import make_tiny_model

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_batch_size_ladder():
    assert batch_size_ladder(1) == [1]
    assert batch_size_ladder(3) == [1, 2, 4]
    assert batch_size_ladder(8) == [1, 2, 4, 8]
    assert batch_size_ladder(20) == [1, 2, 4, 8, 16, 24]
    ladder = batch_size_ladder(256)
    assert ladder[:5] == [1, 2, 4, 8, 16] and ladder[-1] == 256
    assert all(b - a == 8 for a, b in zip(ladder[3:], ladder[4:]))


def test_padded_batch_size():
    ladder = batch_size_ladder(256)
    assert [padded_batch_size(ladder, b) for b in (1, 2, 3, 5, 8, 9, 17, 255, 256)] == [
        1, 2, 4, 8, 8, 16, 24, 256, 256]
    assert padded_batch_size(ladder, 257) is None


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
