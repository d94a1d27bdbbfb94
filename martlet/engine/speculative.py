"""Speculative decoding with prompt lookup: guess the next tokens from the sequence itself.

Text that repeats (quoting, editing, code) continues the way it did before: the tokens that
followed an earlier occurrence of a sequence's last n tokens are a good guess for what follows
now. The next step feeds the sequence's last token and the k guesses to the model at once (k + 1
query tokens, laid out like a prompt chunk), and the sampler checks each guess against the
target's own choice at that position (`Sampler`, rejection sampling). The engine keeps the
leading guesses that pass plus the target's token after them, so each verification step makes 1
to k + 1 tokens, exactly the tokens (greedy) or the distribution (sampling) of decoding one at a
time. The K/V written for rejected guesses stay in the sequence's blocks beyond its computed
tokens, where the next steps overwrite them.
"""

from __future__ import annotations

import numpy as np

from martlet.config import SpeculativeConfig
from martlet.engine.sequence import Sequence
from martlet.layers.sampler import has_penalty

# Above this many running sequences no step speculates: a batch that large already keeps the GPU's
# arithmetic busy, and verifying guesses would cost more than it saves. A first guess, not yet
# measured on a GPU (issue 22 asks for the ShareGPT-like throughput within 3% of no speculation).
MAX_SPECULATIVE_BATCH = 32


class NgramProposer:
    def __init__(self, config: SpeculativeConfig, max_model_len: int) -> None:
        self.config = config
        self.max_model_len = max_model_len

    def propose(self, seq: Sequence) -> list[int]:
        """Up to k tokens to verify after `seq`'s last one; none if it may not speculate now."""
        if not self.may_speculate(seq):
            return []
        k = min(self.config.num_speculative_tokens, self._room(seq))
        if k < 1:
            return []
        return find_continuation(np.asarray(seq.token_ids), k, self.config.prompt_lookup_min,
                                 self.config.prompt_lookup_max)

    def _room(self, seq: Sequence) -> int:
        """Guesses that fit before max_tokens or the context runs out (the step adds one token of its own)."""
        max_tokens = seq.params.max_tokens or self.max_model_len
        return min(max_tokens - seq.num_output_tokens, self.max_model_len - len(seq)) - 1

    @staticmethod
    def may_speculate(seq: Sequence) -> bool:
        """A decoding sequence whose sampling does not depend on the tokens before each row: penalties,
        grammars and min_tokens do, and logprobs are reported one row per step."""
        params = seq.params
        return (seq.num_uncomputed_tokens == 1 and seq.grammar is None and not has_penalty(seq)
                and params.logprobs is None and seq.num_output_tokens >= params.min_tokens)


def find_continuation(tokens: np.ndarray, k: int, min_n: int, max_n: int) -> list[int]:
    """The up to `k` tokens that followed an earlier occurrence of the last n tokens, for the largest
    n in [min_n, max_n] that occurred before; [] if none did. The occurrence is the latest that k
    tokens follow (the freshest context), or if none is, the earliest (the most tokens): in a run of
    one repeated token the latest occurrence ends just before the last token, and would give one.

    One pass over the tokens finds where the last token occurred before (not at the end, so a token
    follows each); each longer n then keeps the places where the token before matches too.
    """
    ends = np.flatnonzero(tokens[:-1] == tokens[-1])  # where earlier occurrences end
    n = 1
    while n < max_n and ends.size:
        longer = ends[ends >= n]
        longer = longer[tokens[longer - n] == tokens[-1 - n]]
        if not longer.size:
            break
        ends, n = longer, n + 1
    if not ends.size or n < min_n:
        return []
    followed_by_k = ends[ends < len(tokens) - k]
    end = followed_by_k[-1] if followed_by_k.size else ends[0]
    return tokens[end + 1 : end + 1 + k].tolist()


def accepted_prefix(drafts: list[int], sampled: list[int]) -> list[int]:
    """The tokens a verification step makes. `sampled[i]` is the sampler's token for the position
    after `drafts[:i]`: the draft itself where the sampler accepted it, its own choice otherwise.
    The drafts up to the first one not accepted stand, then the sampler's token there (or after the
    last draft, if all were accepted)."""
    num_accepted = 0
    while num_accepted < len(drafts) and sampled[num_accepted] == drafts[num_accepted]:
        num_accepted += 1
    return sampled[: num_accepted + 1]
