"""How one request wants its tokens chosen, and when it wants to stop.

Field names and meanings follow vLLM's `SamplingParams`, so code written for it ports over.
Every field is checked at construction: a bad value raises a ValueError naming the field and
the range it must lie in, before anything reaches the engine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

MAX_LOGPROBS = 20  # top log-probabilities a request may ask for per token (vLLM's default limit)
MAX_N = 128  # choices one request may ask for
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for logit_bias values: [-100, 100]


@dataclass
class StructuredOutputsParams:
    """The output must follow exactly one of these (vLLM's shape): a JSON schema (dict or JSON
    text), any JSON object, a regular expression, one of a list of strings, or an EBNF grammar
    (GBNF dialect, root rule `root`). Checked at construction: a bad schema or pattern raises
    a ValueError that says what is wrong with it. `disable_any_whitespace` makes JSON compact (no
    newlines or indents to wander in), which keeps small models from looping on whitespace."""

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False

    def __post_init__(self) -> None:
        given = [name for name in ("json", "regex", "choice", "grammar", "json_object") if getattr(self, name)]
        if len(given) != 1:
            raise ValueError("SamplingParams.structured_outputs must set exactly one of json, regex, choice, "
                             f"grammar or json_object, got {given or 'none'}")
        if isinstance(self.json, str):
            try:
                self.json = json.loads(self.json)
            except json.JSONDecodeError as exc:
                raise ValueError(f"SamplingParams.structured_outputs.json is not valid JSON: {exc}") from exc
        from martlet.structured_output import build_grammar  # xgrammar loads only when it is used

        build_grammar(self)  # one that builds is valid

    @property
    def kind(self) -> str:
        return next(name for name in ("json", "regex", "choice", "grammar", "json_object") if getattr(self, name))

    @property
    def key(self) -> tuple[str, str, bool]:
        """What identifies the compiled grammar, for the cache."""
        value: Any = getattr(self, self.kind)
        return self.kind, value if isinstance(value, str) else json.dumps(value, sort_keys=True), \
            self.disable_any_whitespace


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
    prompt_logprobs: int | None = None
    # OpenAI's logit_bias: token id -> a value in [-100, 100] added to that token's logit.
    logit_bias: dict[int, float] | None = None
    structured_outputs: StructuredOutputsParams | None = None
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
        for name in ("max_tokens", "logprobs", "prompt_logprobs", "seed"):
            value = getattr(self, name)
            _check(value is None or _is_int(value), name, value, "must be an integer or None")
        _check(self.stop is None or isinstance(self.stop, (str, list, tuple)), "stop", self.stop,
               "must be a string or a list of strings")
        _check(self.stop_token_ids is None or isinstance(self.stop_token_ids, (list, tuple)), "stop_token_ids",
               self.stop_token_ids, "must be a list of token ids")
        _check(self.logit_bias is None or isinstance(self.logit_bias, dict), "logit_bias", self.logit_bias,
               "must be a dict of token id -> bias")
        _check(self.structured_outputs is None or isinstance(self.structured_outputs, StructuredOutputsParams),
               "structured_outputs", self.structured_outputs, "must be a StructuredOutputsParams")

    def _validate(self) -> None:
        _check(1 <= self.n <= MAX_N, "n", self.n, f"must be in [1, {MAX_N}]")
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
        # The grammar decides where a structured output ends: nothing may keep it from ending there.
        _check(self.structured_outputs is None or (self.min_tokens == 0 and not self.ignore_eos), "structured_outputs",
               {"min_tokens": self.min_tokens, "ignore_eos": self.ignore_eos},
               "cannot be used with min_tokens or ignore_eos (the grammar decides where the output ends)")
        _check(self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_LOGPROBS, "prompt_logprobs",
               self.prompt_logprobs, f"must be in [0, {MAX_LOGPROBS}]")
        _check(all(_is_int(t) and t >= 0 and _is_number(b) and abs(b) <= MAX_LOGIT_BIAS
                   for t, b in (self.logit_bias or {}).items()), "logit_bias", self.logit_bias,
               f"must map non-negative token ids to biases in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]")
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
