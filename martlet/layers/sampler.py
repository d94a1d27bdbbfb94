"""From logits to tokens, one row per sequence, each with its own sampling parameters.

Order of operations (as in vLLM): log-probabilities of the raw logits (if asked), logit_bias,
penalties, min_tokens masking, the grammar's token bitmask (structured output), then greedy rows
take the argmax while the others go through temperature, top-k, top-p and min-p before drawing.
Drawing uses the exponential-race trick (argmax of p / Exp(1) noise is a sample from p) so a whole
batch samples in one op; a seeded sequence draws its noise from its own generator, which makes its
tokens independent of batch-mates.

The common case, an all-greedy batch with no penalties and no logprobs, is a single argmax.

Speculative decoding adds a draft token to some rows (see `martlet/engine/speculative.py`): the row
returns the draft when it is accepted, and otherwise a token of its own. Greedy rows accept a
draft that is their argmax. Sampled rows use the rejection-sampling rule for a draft that is a
point mass (prompt lookup): accept with probability p(draft); on rejection draw from p with the
draft's mass removed. Either way the token that comes out is distributed as p.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from martlet.device import to_device
from martlet.engine.sequence import Sequence


@dataclass
class SamplerOutput:
    """Device tensors, so that reading them (a sync) can wait until the host needs them."""

    token_ids: torch.Tensor  # [N] int64
    # If any row asked for logprobs: top-N ids and logprobs [N, K], and the sampled token's [N].
    top_ids: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None
    sampled_logprobs: torch.Tensor | None = None


def logprob_rows(top_ids: list[list[int]], top_logprobs: list[list[float]], tokens: list[int],
                 sampled_logprobs: list[float], counts: list[int]) -> list[dict[int, float]]:
    """Per row: {token id: logprob} for the row's top-N tokens and its sampled one."""
    rows = []
    for i, n in enumerate(counts):
        row = dict(zip(top_ids[i][:n], top_logprobs[i][:n]))
        row[tokens[i]] = sampled_logprobs[i]
        rows.append(row)
    return rows


class Sampler:
    def __init__(self, device: torch.device, seed: int) -> None:
        self.generator = torch.Generator(device=device).manual_seed(seed)
        # Set by the engine: for a batch where some sequence follows a grammar, each row's allowed tokens
        # (host, int32 [rows, ceil(vocab / 32)]), or None if no row follows one now. Called after the
        # logits are launched, so the host fills it while the device computes them.
        self.grammar_bitmask: Callable[[list[Sequence]], torch.Tensor | None] | None = None

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence], drafts: torch.Tensor | None = None
                 ) -> SamplerOutput:
        """One token per row of `logits`; `seqs[i]` is row i's sequence. `drafts` ([rows] int64, -1
        for none) are tokens to verify: a row returns its draft exactly when it accepts it."""
        logits = logits.float()
        all_logprobs = None
        if any(s.params.logprobs is not None for s in seqs):
            all_logprobs = torch.log_softmax(logits, dim=-1)  # of the raw logits, as vLLM reports them
        if any(s.params.logit_bias for s in seqs):
            logits = apply_logit_bias(logits, seqs)
        if any(has_penalty(s) for s in seqs):
            logits = apply_penalties(logits, seqs)
        if any(s.num_output_tokens < s.params.min_tokens for s in seqs):
            logits = mask_stop_tokens(logits, seqs)
        if self.grammar_bitmask is not None and any(s.grammar is not None for s in seqs):
            bitmask = self.grammar_bitmask(seqs)
            if bitmask is not None:
                logits = apply_token_bitmask(logits, to_device(bitmask, logits.device))
        if all(s.params.greedy for s in seqs):
            tokens = logits.argmax(dim=-1)
        else:
            tokens = self._sample(logits, seqs, drafts)
        if all_logprobs is None:
            return SamplerOutput(tokens)
        k = max(max(s.params.logprobs or 0 for s in seqs), 1)
        top_logprobs, top_ids = all_logprobs.topk(k, dim=-1)
        sampled = all_logprobs.gather(1, tokens[:, None]).squeeze(1)
        return SamplerOutput(tokens, top_ids, top_logprobs, sampled)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence], drafts: torch.Tensor | None) -> torch.Tensor:
        device = logits.device
        temperature = to_device([s.params.temperature or 1.0 for s in seqs], device)
        probs = torch.softmax(logits / temperature[:, None], dim=-1)
        if any(s.params.top_k != -1 or s.params.top_p < 1.0 or s.params.min_p > 0.0 for s in seqs):
            probs = filter_probs(
                probs,
                top_k=to_device([s.params.top_k for s in seqs], device),
                top_p=to_device([s.params.top_p for s in seqs], device),
                min_p=to_device([s.params.min_p for s in seqs], device),
            )
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        for i, seq in enumerate(seqs):
            if seq.generator is not None:
                noise[i].exponential_(generator=seq.generator)
        if drafts is None:
            sampled = (probs / noise).argmax(dim=-1)
        else:
            sampled = self._verify(probs, noise, drafts, seqs)
        greedy = to_device([s.params.greedy for s in seqs], device)
        return torch.where(greedy, logits.argmax(dim=-1), sampled)

    def _verify(self, probs: torch.Tensor, noise: torch.Tensor, drafts: torch.Tensor, seqs: list[Sequence]
                ) -> torch.Tensor:
        """Rejection sampling of each row's draft (rows with none just sample). `probs` need not sum
        to 1 (top-k/top-p zero some), so p(draft) is taken over their sum."""
        has_draft = drafts >= 0
        index = drafts.clamp(min=0)[:, None]
        p_draft = probs.gather(1, index).squeeze(1) / probs.sum(dim=-1)
        uniform = torch.rand(len(seqs), device=probs.device, generator=self.generator)
        for i, seq in enumerate(seqs):
            if seq.generator is not None:
                uniform[i] = torch.rand((), device=probs.device, generator=seq.generator)
        accepted = has_draft & (uniform < p_draft)
        # The exponential race needs no renormalizing: argmax of p / noise over what is left is a draw
        # from what is left.
        residual = torch.where(has_draft[:, None], probs.scatter(1, index, 0.0), probs)
        return torch.where(accepted, drafts, (residual / noise).argmax(dim=-1))


PROMPT_LOGPROBS_SLICE = 256  # prompt positions scored at once


@torch.inference_mode()
def record_prompt_logprobs(seqs: list[Sequence], num_new_tokens: list[int],
                           logits_of: Callable[[int, int], torch.Tensor]) -> None:
    """Append to `seq.prompt_logprobs` the prompt tokens this step scores (the logits at position p
    score token p + 1) for the sequences that want them; `logits_of(start, stop)` are the logits of
    the step's hidden rows start:stop. It reads the result back at once, a host
    sync, in the steps that carry such a prompt only: a scoring request, not the serving hot path."""
    row = 0
    for seq, n in zip(seqs, num_new_tokens):
        start = seq.num_computed_tokens
        if seq.wants_prompt_logprobs:
            if not seq.prompt_logprobs:
                seq.prompt_logprobs.append(None)  # nothing scores the first token
            end = min(start + n, seq.num_prompt_tokens - 1)  # positions whose next token is in the prompt
            # A slice at a time: the logits of a whole chunk (8192 x vocabulary) would not fit in the
            # memory the engine profiled for a step.
            while start <= (first := len(seq.prompt_logprobs) - 1) < end:  # the first position not scored
                last = min(end, first + PROMPT_LOGPROBS_SLICE)
                logits = logits_of(row + first - start, row + last - start)
                logprobs = torch.log_softmax(logits.float(), -1)
                targets = torch.tensor(seq.token_ids[first + 1 : last + 1], device=logprobs.device)
                top_logprobs, top_ids = logprobs.topk(max(seq.params.prompt_logprobs, 1), dim=-1)
                actual = logprobs.gather(1, targets[:, None]).squeeze(1)
                seq.prompt_logprobs += logprob_rows(top_ids.tolist(), top_logprobs.tolist(), targets.tolist(),
                                                    actual.tolist(), [seq.params.prompt_logprobs] * len(targets))
        row += n


def has_penalty(seq: Sequence) -> bool:
    p = seq.params
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Repetition penalty over prompt and output tokens (CTRL/HF style: divide positive logits,
    multiply negative ones); presence and frequency penalties over output tokens (OpenAI style)."""
    num_rows, vocab = logits.shape
    device = logits.device
    seen = torch.zeros(num_rows, vocab, dtype=torch.bool, device=device)
    counts = torch.zeros(num_rows, vocab, device=device)
    for i, seq in enumerate(seqs):
        seen[i, torch.tensor(seq.token_ids, device=device)] = True
        out = torch.tensor(seq.output_token_ids, dtype=torch.long, device=device)
        counts[i].index_add_(0, out, torch.ones(len(out), device=device))
    rep = torch.tensor([s.params.repetition_penalty for s in seqs], device=device)[:, None]
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalized, logits)
    freq = torch.tensor([s.params.frequency_penalty for s in seqs], device=device)[:, None]
    presence = torch.tensor([s.params.presence_penalty for s in seqs], device=device)[:, None]
    return logits - freq * counts - presence * (counts > 0)


def apply_logit_bias(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Add each row's logit_bias (OpenAI's: -100 bans a token in practice, 100 all but forces it)."""
    rows, cols, values = [], [], []
    for i, seq in enumerate(seqs):
        for token, bias in (seq.params.logit_bias or {}).items():
            rows.append(i)
            cols.append(token)
            values.append(float(bias))
    device = logits.device
    index = (to_device(rows, device, torch.int64), to_device(cols, device, torch.int64))
    return logits.index_put(index, to_device(values, device, logits.dtype), accumulate=True)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """-inf where a row's bit is 0 (bit j of word w stands for token 32 * w + j). Torch ops, not
    xgrammar's Triton kernel: as fast here (0.13 against 0.11 ms at 64 rows on an H200), and nothing
    to compile in the middle of serving (that kernel specializes on the row count)."""
    shifts = torch.arange(32, device=logits.device, dtype=torch.int32)
    allowed = ((bitmask[:, :, None] >> shifts) & 1).flatten(1)[:, : logits.shape[1]]
    return logits.masked_fill(allowed == 0, float("-inf"))


def mask_stop_tokens(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Rows still short of min_tokens may not pick a token that would end them."""
    rows, cols = [], []
    for i, seq in enumerate(seqs):
        if seq.num_output_tokens < seq.params.min_tokens:
            stop_ids = list(seq.params.stop_token_ids) + ([] if seq.params.ignore_eos else seq.eos_token_ids)
            rows += [i] * len(stop_ids)
            cols += stop_ids
    if not rows:  # ignore_eos and no stop token ids: nothing could end these rows early
        return logits
    index = (to_device(rows, logits.device), to_device(cols, logits.device))
    return logits.index_put(index, torch.tensor(float("-inf"), device=logits.device))


def filter_probs(
    probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> torch.Tensor:
    """Zero the probabilities outside each row's top-k, top-p nucleus and min-p floor.

    top_k is -1 for off; the most likely token always survives.
    """
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    ranks = torch.arange(probs.shape[-1], device=probs.device)[None, :]
    k = torch.where(top_k < 1, probs.shape[-1], top_k)[:, None]
    drop = ranks >= k
    kept = sorted_probs.masked_fill(drop, 0.0)
    kept = kept / kept.sum(dim=-1, keepdim=True)
    mass_before = kept.cumsum(dim=-1) - kept
    drop |= mass_before >= top_p[:, None]
    drop |= sorted_probs < min_p[:, None] * sorted_probs[:, :1]
    drop[:, 0] = False
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
