"""Real text for judging lossy formats with the real default model (SmolLM2-135M), and the figure
they are judged by: next-token top-1 agreement with the unquantized model at every position of three
public-domain passages, and greedy answers, which must stay right. Shared by the weight formats'
test (test_quant_quality.py) and the KV cache's (test_kv_cache_quant.py); the README reports both.
"""

from __future__ import annotations

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


def load(**engine_args) -> LLM:
    return LLM(str(MODEL), device="cpu", dtype="float32", max_model_len=512, num_kv_blocks=64, quiet=True,
               **engine_args)


@torch.inference_mode()
def next_token_predictions(llm: LLM, token_ids: list[int]) -> torch.Tensor:
    """The model's top-1 next token after every prefix of token_ids: one prefill, all positions (its
    attention reads every key back from the KV cache, in the cache's format)."""
    return next_token_logits(llm, token_ids).argmax(-1)


def next_token_logits(llm: LLM, token_ids: list[int]) -> torch.Tensor:
    """The logits [len(token_ids), vocab] of `next_token_predictions`."""
    runner = llm.engine.runner
    seq = Sequence("agreement", token_ids, SamplingParams(), eos_token_ids=[])
    seq.block_table = list(range(-(-len(token_ids) // runner.block_size)))
    input_ids, positions, meta = runner._tensors(runner._plan(ScheduledBatch([seq], [len(token_ids)], num_prefills=1)))
    hidden = runner.model(input_ids, positions, meta)
    return runner.model.compute_logits(hidden)


def greedy_answers(llm: LLM) -> list[str]:
    outputs = llm.generate(QUESTIONS, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    return [out.outputs[0].text for out in outputs]


class Reference:
    """The unquantized model's predictions and answers, to hold a quantized one against."""

    def __init__(self) -> None:
        llm = load()
        self.tokenized = [llm.engine.tokenizer(text)["input_ids"] for text in PASSAGES]
        self.predictions = [next_token_predictions(llm, ids) for ids in self.tokenized]
        self.answers = greedy_answers(llm)

    def agreement(self, llm: LLM) -> float:
        agree = sum(int((next_token_predictions(llm, ids) == expected).sum())
                    for ids, expected in zip(self.tokenized, self.predictions))
        return agree / sum(len(ids) for ids in self.tokenized)
