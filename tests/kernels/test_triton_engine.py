"""The whole engine on the Triton attention backend gives Hugging Face's greedy tokens.

On a CPU this runs the kernels in Triton's interpreter (see conftest.py); on a GPU, natively (and HF
there too, so both sides share the GPU's fp32 arithmetic).
Prompts cross block boundaries (block 8), two share a 16-token prefix (a prefix-cache hit), and a
token budget of 24 per step splits the long ones into chunks that attend to their cached part.
"""

import random

import pytest
import torch
import transformers

from martlet import LLM, SamplingParams
from martlet.testing import make_tiny_model

MAX_TOKENS = 8


def _prompts(vocab: int) -> list[list[int]]:
    rng = random.Random(0)
    shared = [rng.randrange(3, vocab) for _ in range(16)]
    lengths = [1, 7, 8, 9, 40]
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths] + [shared + [5, 6, 7], shared + [8, 9]]


@pytest.mark.parametrize("variant", ["llama", "llama_tied", "qwen3"])  # GQA 2 / MQA / QK norm, head dim 32
def test_triton_backend_greedy_matches_hf(variant, tmp_path):
    path = make_tiny_model(tmp_path / variant, variant)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    prompts = _prompts(hf.config.vocab_size)
    with torch.no_grad():
        expected = [
            hf.generate(torch.tensor([p], device=device), max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS,
                        do_sample=False, pad_token_id=0)[0, len(p):].tolist()
            for p in prompts
        ]
    llm = LLM(str(path), device=device, dtype="float32", attention_backend="triton", block_size=8,
              max_num_batched_tokens=24, max_num_seqs=4)
    assert llm.engine.config.attention_backend == "triton"
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
