"""From logits to tokens, one row per sequence, each with its own sampling parameters.

Order of operations (as in vLLM): log-probabilities of the raw logits (if asked), penalties,
min_tokens masking, then greedy rows take the argmax while the others go through temperature,
top-k, top-p and min-p before drawing. Drawing uses the exponential-race trick
(argmax of p / Exp(1) noise is a sample from p) so a whole batch samples in one op; a seeded
sequence draws its noise from its own generator, which makes its tokens independent of batch-mates.

The common case, an all-greedy batch with no penalties and no logprobs, is a single argmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from martlet.engine.sequence import Sequence


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [N] int64
    # Per row {token id: logprob} of the top-N tokens and the sampled one; None if nobody asked.
    logprobs: list[dict[int, float]] | None = None


class Sampler:
    def __init__(self, device: torch.device, seed: int) -> None:
        self.generator = torch.Generator(device=device).manual_seed(seed)

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        logits = logits.float()
        logprobs = self._logprobs(logits, seqs) if any(s.params.logprobs is not None for s in seqs) else None
        if any(_has_penalty(s) for s in seqs):
            logits = apply_penalties(logits, seqs)
        if any(s.num_output_tokens < s.params.min_tokens for s in seqs):
            logits = mask_stop_tokens(logits, seqs)
        if all(s.params.greedy for s in seqs):
            tokens = logits.argmax(dim=-1)
        else:
            tokens = self._sample(logits, seqs)
        if logprobs is not None:
            logprobs = _with_sampled(logprobs, tokens)
        return SamplerOutput(tokens, logprobs)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        device = logits.device
        temperature = torch.tensor([s.params.temperature or 1.0 for s in seqs], device=device)
        probs = torch.softmax(logits / temperature[:, None], dim=-1)
        if any(s.params.top_k != -1 or s.params.top_p < 1.0 or s.params.min_p > 0.0 for s in seqs):
            probs = filter_probs(
            probs,
                top_k=torch.tensor([s.params.top_k for s in seqs], device=device),
                top_p=torch.tensor([s.params.top_p for s in seqs], device=device),
                min_p=torch.tensor([s.params.min_p for s in seqs], device=device),
            )
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        for i, seq in enumerate(seqs):
            if seq.generator is not None:
                noise[i].exponential_(generator=seq.generator)
        sampled = (probs / noise).argmax(dim=-1)
        greedy = torch.tensor([s.params.greedy for s in seqs], device=device)
        return torch.where(greedy, logits.argmax(dim=-1), sampled)

    @staticmethod
    def _logprobs(logits: torch.Tensor, seqs: list[Sequence]) -> tuple:
        all_logprobs = torch.log_softmax(logits, dim=-1)
        counts = [s.params.logprobs or 0 for s in seqs]
        top_values, top_ids = all_logprobs.topk(max(max(counts), 1), dim=-1)
        return all_logprobs, (top_ids, top_values), counts


def _with_sampled(logprobs: tuple, tokens: torch.Tensor) -> list[dict[int, float]]:
    """Per row: {token id: logprob} for the top-N tokens and the sampled one."""
    all_logprobs, (top_ids, top_values), counts = logprobs
    sampled_lp = all_logprobs.gather(1, tokens[:, None]).squeeze(1).tolist()
    top_ids, top_values, token_list = top_ids.tolist(), top_values.tolist(), tokens.tolist()
    rows: list[dict[int, float]] = []
    for i, n in enumerate(counts):
        row = dict(zip(top_ids[i][:n], top_values[i][:n]))
        row[token_list[i]] = sampled_lp[i]
        rows.append(row)
    return rows


def _has_penalty(seq: Sequence) -> bool:
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


def mask_stop_tokens(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Rows still short of min_tokens may not pick a token that would end them."""
    logits = logits.clone()
    for i, seq in enumerate(seqs):
        if seq.num_output_tokens < seq.params.min_tokens:
            stop_ids = list(seq.params.stop_token_ids)
            if not seq.params.ignore_eos:
                stop_ids += seq.eos_token_ids
            logits[i, stop_ids] = float("-inf")
    return logits


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
