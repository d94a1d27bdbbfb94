"""What `LLM.generate` hands back: vLLM's `RequestOutput` shape."""

from __future__ import annotations

from dataclasses import dataclass, field

# One dict per generated token: token id -> log-probability, holding the top-N tokens and the
# sampled one.
TokenLogprobs = dict[int, float]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" or "length" once finished
    stop_reason: int | str | None = None  # the stop string or stop token that ended it, if any
    logprobs: list[TokenLogprobs] | None = None
    cumulative_logprob: float | None = None  # of the sampled tokens, when logprobs are asked for

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """Wall-clock times (time.perf_counter seconds) of a request's life."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0
    # Speculative decoding: steps that verified proposals, tokens proposed, and tokens accepted.
    num_spec_steps: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    @property
    def acceptance_rate(self) -> float | None:
        """Share of the proposed tokens that were accepted."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else None

    @property
    def mean_accepted_length(self) -> float | None:
        """Tokens a verification step made on average: the accepted proposals plus the target's own
        (vLLM's "mean acceptance length")."""
        return 1 + self.num_accepted_tokens / self.num_spec_steps if self.num_spec_steps else None

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def e2e_latency(self) -> float | None:
        return None if self.finished_time is None else self.finished_time - self.arrival_time


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics = field(repr=False, default=None)  # type: ignore[assignment]
    # With SamplingParams.prompt_logprobs: per prompt token, None for the first, then the top tokens
    # and the actual one with their log-probabilities given the tokens before.
    prompt_logprobs: list[TokenLogprobs | None] | None = None
