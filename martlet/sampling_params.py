"""How one request wants its tokens chosen, and when it wants to stop.

Field names and meanings follow vLLM's `SamplingParams`, so code written for it ports over.
Every field is checked at construction: a bad value raises a ValueError naming the field and
the range it must lie in, before anything reaches the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_LOGPROBS = 20  # top log-probabilities a request may ask for per token (vLLM's default limit)


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    detokenize: bool = True
    # Filled in from `stop`; always a list so the engine need not care how the user wrote it.
    stop_strings: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._check_types()
        self.stop_strings = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self._validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def _check_types(self) -> None:
        """Wrong types get the same field-naming ValueError as wrong values, not a TypeError later."""
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            _check(_is_number(getattr(self, name)), name, getattr(self, name), "must be a number")
        for name in ("n", "top_k", "min_tokens"):
            _check(_is_int(getattr(self, name)), name, getattr(self, name), "must be an integer")
        for name in ("max_tokens", "logprobs", "seed"):
            value = getattr(self, name)
            _check(value is None or _is_int(value), name, value, "must be an integer or None")
        _check(self.stop is None or isinstance(self.stop, (str, list, tuple)), "stop", self.stop,
               "must be a string or a list of strings")
        _check(self.stop_token_ids is None or isinstance(self.stop_token_ids, (list, tuple)), "stop_token_ids",
               self.stop_token_ids, "must be a list of token ids")

    def _validate(self) -> None:
        _check(self.n == 1, "n", self.n, "must be 1 (parallel sampling is not supported yet)")
        _check(self.temperature >= 0.0, "temperature", self.temperature, "must be >= 0")
        _check(0.0 < self.top_p <= 1.0, "top_p", self.top_p, "must be in (0, 1]")
        _check(self.top_k == -1 or self.top_k >= 1, "top_k", self.top_k, "must be -1 (off) or >= 1")
        _check(0.0 <= self.min_p <= 1.0, "min_p", self.min_p, "must be in [0, 1]")
        _check(self.repetition_penalty > 0.0, "repetition_penalty", self.repetition_penalty, "must be > 0")
        _check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", self.presence_penalty,
               "must be in [-2, 2]")
        _check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", self.frequency_penalty,
               "must be in [-2, 2]")
        _check(self.max_tokens is None or self.max_tokens >= 1, "max_tokens", self.max_tokens,
               "must be >= 1 (or None for up to the context length)")
        _check(self.min_tokens >= 0, "min_tokens", self.min_tokens, "must be >= 0")
        _check(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
               self.min_tokens, f"must be <= max_tokens ({self.max_tokens})")
        _check(self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS, "logprobs", self.logprobs,
               f"must be in [0, {MAX_LOGPROBS}]")
        _check(all(isinstance(s, str) and s for s in self.stop_strings), "stop", self.stop,
               "must be a non-empty string or a list of them")
        _check(self.detokenize or not self.stop_strings, "stop", self.stop,
               "needs detokenize=True (stop strings are matched in the text)")
        _check(all(_is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
               self.stop_token_ids, "must be a list of non-negative token ids")
        # The range torch.Generator.manual_seed accepts.
        _check(self.seed is None or -(2**63) <= self.seed < 2**64, "seed", self.seed,
               "must be in [-2**63, 2**64)")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check(ok: bool, name: str, value: object, rule: str) -> None:
    if not ok:
        raise ValueError(f"SamplingParams.{name} {rule}, got {value!r}")
