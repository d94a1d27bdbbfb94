"""From a request's tokens to text deltas, on the front end's side of the engine.

The engine core runs with `detokenize=False`: it produces token ids and nothing else, so the
step loop never waits on a tokenizer. Here each request's tokens go through the same
`IncrementalDetokenizer` the offline engine uses, fed one token at a time in the same order and
with the same stop rules, so the text comes out exactly as `LLM.generate` would give it. A stop
string is found here, a step or so after the engine made its token; the caller then aborts the
engine request, and the few tokens the engine made past the stop are never shown or counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from martlet.engine.detokenizer import IncrementalDetokenizer
from martlet.outputs import TokenLogprobs
from martlet.sampling_params import SamplingParams


@dataclass
class Delta:
    """What one request gained since the last delta."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # with the request's first delta, if asked

    def __iadd__(self, later: Delta) -> Delta:
        self.text += later.text
        self.token_ids += later.token_ids
        if later.logprobs is not None:
            self.logprobs = (self.logprobs or []) + later.logprobs
        self.prompt_logprobs = self.prompt_logprobs or later.prompt_logprobs
        self.finish_reason, self.stop_reason = later.finish_reason, later.stop_reason
        return self


class OutputProcessor:
    """Follows one request: turns the tokens the engine sends for it into `Delta`s."""

    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.detokenizer = None
        if tokenizer is not None:
            self.detokenizer = IncrementalDetokenizer(
                tokenizer, prompt_token_ids, params.stop_strings, params.skip_special_tokens
            )
        self.min_tokens = params.min_tokens  # stop strings count only after these, as offline
        self.num_tokens = 0  # output tokens taken so far (a stop string can end them early)
        self.num_chars = 0  # characters of text handed out so far
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def process(self, token_ids: list[int], logprobs: list[TokenLogprobs] | None, finish_reason: str | None,
                stop_reason: int | str | None) -> Delta:
        """Take the tokens the engine made for this request since the last call (and their logprobs)."""
        if finish_reason is not None:
            self.finish_reason, self.stop_reason = finish_reason, stop_reason
        # The engine itself stops only on a stop token or EOS (stop strings are ours): that last
        # token counts as output but, as in the offline engine, never reaches the text.
        shown = len(token_ids) - 1 if finish_reason == "stop" else len(token_ids)
        start = self.num_tokens
        for i, token in enumerate(token_ids):
            self.num_tokens += 1
            if i < shown and self._add_token(token):
                break
        taken = self.num_tokens - start
        if self.finished and self.detokenizer is not None:
            self.detokenizer.flush()
        return Delta(
            text=self._take_text(),
            token_ids=token_ids[:taken],
            logprobs=logprobs[:taken] if logprobs is not None else None,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
        )

    def _add_token(self, token: int) -> bool:
        """Detokenize one token; True if it completed a stop string (which ends the request)."""
        if self.detokenizer is None:
            return False
        stop = self.detokenizer.add_tokens([token], check_stop=self.num_tokens >= self.min_tokens)
        if stop is None:
            return False
        self.finish_reason, self.stop_reason = "stop", stop
        return True

    def _take_text(self) -> str:
        if self.detokenizer is None:
            return ""
        # Until the end, hold back what could still turn out to be the start of a stop string.
        text = self.detokenizer.text if self.finished else self.detokenizer.stable_text
        delta = text[self.num_chars :]
        self.num_chars = len(text)
        return delta
