"""Structured output: the tokens a sequence may take next, from a grammar, via xgrammar.

A request's `StructuredOutputsParams` becomes an xgrammar `Grammar` when the params are made (so a
bad schema is a ValueError before anything runs), a `CompiledGrammar` in the engine (compiled on a
worker thread, since xgrammar lets go of the GIL while it compiles, and cached by the grammar's
text), and one `GrammarMatcher` per sequence, which takes each token the sequence gets.

Each step, the sampler asks for the batch's bitmask (bit j of word w allows token 32 * w + j) after
the step's logits are launched: the host fills the constrained rows, some microseconds each, while
the device computes the logits, and the sampler masks the logits with it on the device.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch
import xgrammar as xgr

from martlet.engine.sequence import Sequence

if TYPE_CHECKING:  # sampling_params calls build_grammar: the params are only named here
    from martlet.sampling_params import StructuredOutputsParams

# Compiled grammars kept, most recently used first: one is 35-300 KB with SmolLM2's 49,152 tokens
# (a token mask cache per grammar state), so the cache stays under some tens of MB.
MAX_CACHED_GRAMMARS = 128
XGRAMMAR_CACHE_BYTES = 64 << 20
# Whitespace allowed between two JSON tokens: room for any indentation, but a model that falls into
# writing blanks cannot spend its whole max_tokens on one gap.
MAX_JSON_WHITESPACE = 64


def build_grammar(params: StructuredOutputsParams) -> xgr.Grammar:
    """The grammar `params` asks for; a ValueError that says what is wrong if it cannot be built."""
    whitespace = dict(any_whitespace=not params.disable_any_whitespace, max_whitespace_cnt=MAX_JSON_WHITESPACE)
    try:
        match params.kind:
            case "json":
                return xgr.Grammar.from_json_schema(json.dumps(params.json), **whitespace)
            case "json_object":  # any object: extra properties allowed, unlike in a schema
                return xgr.Grammar.from_json_schema('{"type": "object"}', strict_mode=False, **whitespace)
            case "regex":
                return xgr.Grammar.from_regex(params.regex)
            case "choice":
                _check_choices(params.choice)
                literals = " | ".join(json.dumps(choice, ensure_ascii=False) for choice in params.choice)
                return xgr.Grammar.from_ebnf(f"root ::= {literals}")
            case _:
                return xgr.Grammar.from_ebnf(params.grammar)
    except RuntimeError as exc:  # xgrammar's errors start with a time and a C++ source line: drop them
        reason = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", str(exc)).strip()
        raise ValueError(f"SamplingParams.structured_outputs.{params.kind} is not usable: {reason}") from exc


def _check_choices(choices: object) -> None:
    if not (isinstance(choices, list) and choices and all(isinstance(c, str) and c for c in choices)):
        raise ValueError("SamplingParams.structured_outputs.choice must be a list of non-empty strings, "
                         f"got {choices!r}")


class StructuredOutputs:
    """The engine's grammars: compiling (off the step loop), the cache, and the batch bitmask."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int], max_num_seqs: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = stop_token_ids
        self.compiler: xgr.GrammarCompiler | None = None  # made on the worker: it reads the whole vocabulary
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="martlet-grammar")
        self.cache: OrderedDict[tuple[str, str], Future[xgr.CompiledGrammar]] = OrderedDict()
        self.mask = xgr.allocate_token_bitmask(max_num_seqs, vocab_size)
        # One call fills the batch's rows, on one thread. On an H200's host 8 threads saved 0.2 ms of 0.6 at 64
        # rows (benchmarks/grammar_mask_bench.py), but served at 64 in flight a build with them (and torch's
        # fill_ for the mask) took 16 ms a token, against 10 ms for a loop of one-row fills. The cause is not
        # measured; the suspect is torch's thread pool spinning on every core.
        self.batch_matcher = xgr.BatchGrammarMatcher(max_threads=1)

    def compile(self, params: StructuredOutputsParams) -> Future[xgr.CompiledGrammar]:
        """The compiled grammar, now or later; the same future for the same grammar while it is cached."""
        key = params.key
        future = self.cache.get(key)
        if future is None or (future.done() and future.exception() is not None):
            future = self.pool.submit(self._compile, params)
            self.cache[key] = future
            if len(self.cache) > MAX_CACHED_GRAMMARS:
                self.cache.popitem(last=False)
        self.cache.move_to_end(key)
        return future

    def warm_up(self) -> None:
        """Make the compiler on the worker now, rather than with the first grammar."""
        self.pool.submit(self._compiler)

    def _compiler(self) -> xgr.GrammarCompiler:
        if self.compiler is None:
            info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                      stop_token_ids=self.stop_token_ids)
            # xgrammar's cache also holds the pieces grammars share (compiling without it is ~10x slower),
            # and it is unbounded unless told.
            self.compiler = xgr.GrammarCompiler(info, max_threads=1, cache_limit_bytes=XGRAMMAR_CACHE_BYTES)
        return self.compiler

    def _compile(self, params: StructuredOutputsParams) -> xgr.CompiledGrammar:
        return self._compiler().compile_grammar(build_grammar(params))

    def matcher(self, compiled: xgr.CompiledGrammar) -> xgr.GrammarMatcher:
        return xgr.GrammarMatcher(compiled, override_stop_tokens=self.stop_token_ids)

    def bitmask(self, seqs: list[Sequence]) -> torch.Tensor | None:
        """The allowed tokens of each row of the batch (all of them for a row without a grammar), or
        None when no row follows a grammar now."""
        rows = [row for row, seq in enumerate(seqs)
                if seq.grammar is not None and not seq.is_finished and not seq.grammar.is_terminated()]
        if not rows:
            return None
        if len(seqs) > len(self.mask):  # rows of other sequences' proposals can outnumber max_num_seqs
            self.mask = xgr.allocate_token_bitmask(len(seqs), self.vocab_size)
        mask = self.mask[: len(seqs)]
        mask.numpy().fill(-1)  # numpy's fill: torch's would wake its thread pool, which then spins on every core
        self.batch_matcher.batch_fill_next_token_bitmask([seqs[row].grammar for row in rows], mask, rows)
        return mask

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
