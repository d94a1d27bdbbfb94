"""A sequence: one request's tokens and where it stands in the engine.

The scheduler and block manager see only token counts and block ids; the model runner reads
token ids and block tables; the sampler reads the sampling params and the RNG. Nothing here
touches the device.
"""

from __future__ import annotations

import enum
import time
from typing import TYPE_CHECKING

import torch

from martlet.outputs import RequestMetrics
from martlet.sampling_params import SamplingParams

if TYPE_CHECKING:
    from xgrammar import GrammarMatcher

# Stands in token_ids for a token sampled by a step still running on the device (see LLMEngine.step).
PLACEHOLDER = -1


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


class Sequence:
    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        eos_token_ids: list[int],
        prompt: str | None = None,
        generator: torch.Generator | None = None,
        index: int = 0,
    ) -> None:
        self.request_id = request_id
        self.index = index  # which of the request's n choices this is
        self.prompt = prompt
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.eos_token_ids = eos_token_ids
        self.status = SequenceStatus.WAITING
        # Tokens whose K/V are in the cache. Preemption resets it to 0: the sequence is
        # recomputed from its prompt plus everything it generated so far.
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        self.num_hashed_blocks = 0  # leading blocks of block_table registered for prefix caching
        self.sample_row = 0  # row of this sequence's (last) token in the last step's sampler output
        # Speculative decoding: tokens proposed to follow token_ids, verified by the next step. They
        # join token_ids only once accepted.
        self.spec_token_ids: list[int] = []
        # A tree of proposals: the parent of each of spec_token_ids, as a row of [last token, *spec_token_ids]
        # (the first len(spec_token_ids) count); empty for a chain.
        self.spec_parents: list[int] = []
        self.num_draft_computed_tokens = 0  # tokens whose K/V a draft model has in its pool (ditto)
        # What the proposer guessed, when the last token was sampled, the tokens after it are (Medusa).
        self.guessed_token_ids: list[int] | tuple[int, ...] = ()
        # A seeded request owns its RNG, so its samples do not depend on its batch-mates.
        self.generator = generator
        self.output_logprobs: list[dict[int, float]] = []
        self.cumulative_logprob = 0.0  # of the sampled tokens, kept when logprobs are asked for
        # Per prompt token: the top prompt_logprobs tokens and the actual one (None for the first token).
        self.prompt_logprobs: list[dict[int, float] | None] = []
        # The request's other choices, held back until this one's prompt is in the cache, then forked
        # from it so that they share its blocks (n > 1).
        self.forks: list[Sequence] = []
        self.grammar: GrammarMatcher | None = None  # set when the output must follow a grammar
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.metrics = RequestMetrics(arrival_time=time.perf_counter())

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Asked for prompt logprobs and has not got all of them (a fork shares its first sibling's)."""
        return (self.params.prompt_logprobs is not None and self.index == 0
                and len(self.prompt_logprobs) < self.num_prompt_tokens)

    @property
    def has_pending_token(self) -> bool:
        return self.token_ids[-1] == PLACEHOLDER

    def reached_length_limit(self, max_model_len: int, num_tokens: int | None = None) -> bool:
        """No token may follow the first `num_tokens` (default: all of them): max_tokens or the
        context length is used up."""
        num_tokens = len(self.token_ids) if num_tokens is None else num_tokens
        max_tokens = self.params.max_tokens or max_model_len
        return num_tokens - self.num_prompt_tokens >= max_tokens or num_tokens >= max_model_len

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
