"""Greedy output token-identical to Hugging Face transformers, for every supported model shape.

Each variant is a tiny random model saved by transformers; both engines run it in fp32 on the CPU.
The batch mixes prompt lengths from 1 to 100 tokens, on and across block boundaries (block 16).
"""

from __future__ import annotations

import random

import pytest
import torch
import transformers

from martlet import LLM, SamplingParams
from martlet.testing import VARIANTS, make_tiny_model

PROMPT_LENGTHS = [1, 2, 7, 15, 16, 17, 31, 32, 33, 48, 64, 77, 99, 100]
MAX_TOKENS = 12


def make_prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in PROMPT_LENGTHS]


def hf_greedy(model, prompt: list[int], max_tokens: int) -> list[int]:
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp(request.param), request.param)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = make_prompts(hf.config.vocab_size)
    with torch.no_grad():
        expected = [hf_greedy(hf, p, MAX_TOKENS) for p in prompts]
    return path, hf, prompts, expected


GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)


def test_greedy_matches_hf(variant):
    path, _, prompts, expected = variant
    llm = LLM(str(path), device="cpu", dtype="float32")
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_greedy_matches_hf_under_preemption(variant):
    """A pool of 10 blocks (160 tokens) cannot hold the batch: sequences get preempted and
    recomputed, and must still produce exactly the same tokens."""
    path, _, prompts, expected = variant
    llm = LLM(str(path), device="cpu", dtype="float32", num_kv_blocks=10)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    assert sum(o.metrics.num_preemptions for o in outs) > 0
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert llm.engine.block_manager.num_free_blocks == 10


def test_chunked_prefill_matches_hf(variant):
    """A token budget of 24 per step splits long prompts into chunks across steps."""
    path, _, prompts, expected = variant
    llm = LLM(str(path), device="cpu", dtype="float32", max_num_batched_tokens=24, max_num_seqs=5)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected


def test_top_logprobs_match_hf(variant):
    path, hf, prompts, expected = variant
    llm = LLM(str(path), device="cpu", dtype="float32")
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=5)
    chosen = prompts[::4]
    outs = llm.generate([{"prompt_token_ids": p} for p in chosen], params, use_tqdm=False)
    for prompt, out in zip(chosen, outs):
        tokens = out.outputs[0].token_ids
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1]
        ref = torch.log_softmax(logits.float(), dim=-1)
        for step, row in enumerate(out.outputs[0].logprobs):
            top = ref[step].topk(5)
            assert set(top.indices.tolist()) <= set(row)
            for token_id, logprob in row.items():
                assert abs(logprob - ref[step, token_id].item()) < 1e-4
            assert tokens[step] in row


def test_prefix_cache_hits_keep_output(variant):
    """A second batch sharing the first batch's prompts reads their blocks from the cache."""
    path, _, prompts, expected = variant
    llm = LLM(str(path), device="cpu", dtype="float32")
    batch = [{"prompt_token_ids": p} for p in prompts]
    llm.generate(batch, GREEDY, use_tqdm=False)
    hits_before = llm.engine.block_manager.num_hit_tokens
    outs = llm.generate(batch, GREEDY, use_tqdm=False)
    # Every full block of every prompt except a prompt's last token's block is a hit.
    assert llm.engine.block_manager.num_hit_tokens - hits_before == sum((len(p) - 1) // 16 * 16 for p in prompts)
    assert [o.outputs[0].token_ids for o in outs] == expected
