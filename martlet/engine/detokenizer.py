"""Incremental detokenizing with stop strings.

Decoding one token at a time is wrong for byte-level and sentencepiece vocabularies: a token can
be half a UTF-8 character, and a leading space depends on the token before. So each step decodes
a short window of recent tokens twice, with and without the new ones, and emits the difference,
holding it back while it ends in an incomplete character (U+FFFD). The final text is the
concatenation of what was emitted, so a stream and a one-shot result agree by construction.

Stop strings are searched in the text as it grows; the text is cut before the first match. So
that a stream never shows the start of a stop string that later completes, the last
`len(longest stop) - 1` characters are withheld from `stable_text` until the request ends.
"""

from __future__ import annotations

# How many tokens before the new ones give the tokenizer enough context (spaces, merges).
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], stop: list[str], skip_special_tokens: bool):
        self.decode = _fast_decode(tokenizer)
        self.token_ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.token_ids)
        self.stop = stop
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.skip_special_tokens = skip_special_tokens
        self.text = ""
        self.finished = False

    def _decode(self, ids: list[int]) -> str:
        return self.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add_tokens(self, new_token_ids: list[int], check_stop: bool = True) -> str | None:
        """Take the newly generated tokens; return the stop string they completed, if any."""
        self.token_ids += new_token_ids
        prefix = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.token_ids[self.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return None  # nothing printable yet: wait for the rest of the character
        delta = full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        return self._append(delta, check_stop)

    def flush(self) -> None:
        """The request is over: emit whatever is left, even an incomplete character."""
        if not self.finished and self.read_offset < len(self.token_ids):
            prefix = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
            full = self._decode(self.token_ids[self.prefix_offset :])
            self._append(full[len(prefix) :])
        self.finished = True

    def _append(self, delta: str, check_stop: bool = True) -> str | None:
        # Only the new text and the few characters before it can hold a new match.
        search_from = max(0, len(self.text) - self.holdback)
        self.text += delta
        if not check_stop:
            return None
        matches = [(at, stop) for stop in self.stop if (at := self.text.find(stop, search_from)) != -1]
        if not matches:
            return None
        at, stop = min(matches)
        self.text = self.text[:at]
        self.finished = True
        return stop

    @property
    def stable_text(self) -> str:
        """The prefix of `text` that no later stop string can take back."""
        if self.finished or not self.holdback:
            return self.text
        return self.text[: max(0, len(self.text) - self.holdback)]


def _fast_decode(tokenizer):
    """`tokenizer.decode`, or the Rust tokenizer's own where that gives the same text (no clean-up of
    spaces to apply after it): a third of the time (1.2 against 3.9 us for a window), twice per token
    of every running sequence each step."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or tokenizer.clean_up_tokenization_spaces:
        return tokenizer.decode
    return backend.decode
