"""Host and device cost of structured output's per-step work at 64 constrained rows: filling the
token bitmask (xgrammar, one row at a time in Python or a BatchGrammarMatcher on n threads) and
applying it to fp32 logits of SmolLM2's vocabulary (the sampler's torch ops against xgrammar's kernel).

    PYTHONPATH=$PWD python3 benchmarks/grammar_mask_bench.py      # needs build/smollm2-tokenizer in the cache
"""

from __future__ import annotations

import json
import time

import torch
import xgrammar as xgr

from martlet.layers.sampler import apply_token_bitmask
from martlet.testing import load_test_tokenizer

ROWS, VOCAB, REPEAT = 64, 49152, 50
SCHEMA = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}


def ms_per_call(fn) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(REPEAT):
        fn()
    return (time.perf_counter() - start) / REPEAT * 1e3


def main() -> None:
    tok = load_test_tokenizer()
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=VOCAB, stop_token_ids=[tok.eos_token_id])
    grammar = xgr.GrammarCompiler(info, max_threads=1).compile_grammar(
        xgr.Grammar.from_json_schema(json.dumps(SCHEMA), any_whitespace=True, max_whitespace_cnt=64))
    matchers = [xgr.GrammarMatcher(grammar) for _ in range(ROWS)]
    for m in matchers:  # inside the string, where most tokens are allowed
        for t in tok.encode('{"text": "Hello there, this is', add_special_tokens=False):
            assert m.accept_token(t)
    mask = xgr.allocate_token_bitmask(ROWS, VOCAB)
    loop = ms_per_call(lambda: [m.fill_next_token_bitmask(mask, i) for i, m in enumerate(matchers)])
    print(f"fill {ROWS} rows, python loop: {loop:.3f} ms")
    for threads in (1, 2, 4, 8):
        batch = xgr.BatchGrammarMatcher(max_threads=threads)
        print(f"fill {ROWS} rows, BatchGrammarMatcher({threads} threads): "
              f"{ms_per_call(lambda b=batch: b.batch_fill_next_token_bitmask(matchers, mask)):.3f} ms")
    if not torch.cuda.is_available():
        return
    logits = torch.randn(ROWS, VOCAB, device="cuda")

    def torch_ops():  # the sampler's
        return apply_token_bitmask(logits, mask.pin_memory().to("cuda", non_blocking=True))

    def xgrammar_kernel():
        xgr.apply_token_bitmask_inplace(logits, mask.pin_memory().to("cuda", non_blocking=True))

    for name, fn in (("torch ops", torch_ops), ("xgrammar kernel", xgrammar_kernel)):
        host = ms_per_call(fn)
        torch.cuda.synchronize()
        total = ms_per_call(lambda fn=fn: (fn(), torch.cuda.synchronize()))
        print(f"apply, {name}: host {host:.3f} ms a call, with the device {total:.3f} ms")


if __name__ == "__main__":
    main()
