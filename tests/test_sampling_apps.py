"""Offline, on the tiny model: n choices that share their prompt's blocks, logit_bias, prompt
logprobs and structured output (xgrammar), and the sampler's bias and bitmask on hand-made logits."""

from __future__ import annotations

import json
import re
import threading

import jsonschema
import pytest
import torch

from martlet.engine.sequence import Sequence
from martlet.layers import sampler
from martlet.layers.sampler import apply_logit_bias, apply_token_bitmask
from martlet.llm import LLM
from martlet.sampling_params import SamplingParams, StructuredOutputsParams

PROMPT = "A long shared prompt, long enough to fill more than one block of sixteen tokens: one two three four"


def test_logit_bias_and_bitmask_on_logits():
    logits = torch.zeros(2, 40)
    seqs = [Sequence("a", [1], SamplingParams(logit_bias={3: 100, 39: -100}), []),
            Sequence("b", [1], SamplingParams(), [])]
    biased = apply_logit_bias(logits, seqs)
    assert biased[0, 3] == 100 and biased[0, 39] == -100 and biased[1].abs().sum() == 0
    bitmask = torch.tensor([[-1, -1], [1 << 5, 1 << 2]], dtype=torch.int32)  # row 1: tokens 5 and 34 alone
    masked = apply_token_bitmask(logits.clone(), bitmask)
    assert torch.isfinite(masked[1]).nonzero().flatten().tolist() == [5, 34]
    assert torch.isfinite(masked[0]).all()


def test_n_choices_share_the_prompt_blocks(tiny_llm, assert_idle):
    engine = tiny_llm.engine
    computed: list[int] = []
    engine.on_step = lambda batch: computed.append(batch.num_tokens)
    try:
        [out] = tiny_llm.generate(PROMPT, SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=4), use_tqdm=False)
    finally:
        engine.on_step = None
    num_prompt = len(out.prompt_token_ids)
    assert [c.index for c in out.outputs] == [0, 1, 2] and all(len(c.token_ids) == 4 for c in out.outputs)
    # Once for the prompt, then for each fork only the tokens after the shared full blocks, then decodes.
    tail = num_prompt - (num_prompt - 1) // 16 * 16
    assert sum(computed) == num_prompt + 2 * tail + 3 * 3
    # Choice i is seeded with seed + i: the same as one request with that seed.
    [alone] = tiny_llm.generate(PROMPT, SamplingParams(temperature=1.0, seed=6, max_tokens=4), use_tqdm=False)
    assert out.outputs[1].token_ids == alone.outputs[0].token_ids
    greedy = tiny_llm.generate(PROMPT, SamplingParams(n=2, temperature=0, max_tokens=5), use_tqdm=False)[0]
    assert greedy.outputs[0].token_ids == greedy.outputs[1].token_ids
    assert_idle(tiny_llm)


def test_abort_one_choice_then_every_choice(tiny_llm, assert_idle):
    engine = tiny_llm.engine
    request_id = engine.add_request(engine.tokenize(PROMPT), SamplingParams(n=5, max_tokens=50, ignore_eos=True))
    engine.abort_request(request_id, index=4)  # still held back, waiting for the prompt: never forked
    engine.abort_request(request_id, index=0)  # the one computing the prompt: the next one takes over
    for _ in range(3):
        engine.step()
    engine.abort_request(request_id, index=2)
    seqs = engine.requests[request_id]
    assert [s.finish_reason for s in seqs] == ["abort", None, "abort", None, "abort"]
    assert len(engine.scheduler.running) == 2 and all(len(s.output_token_ids) >= 1 for s in (seqs[1], seqs[3]))
    engine.abort_request(request_id)
    while engine.has_unfinished_requests():
        engine.step()
    assert_idle(tiny_llm)


def test_logit_bias_forces_a_token(tiny_llm):
    [out] = tiny_llm.generate("Hello", SamplingParams(temperature=0.8, max_tokens=5, logit_bias={42: 100}),
                              use_tqdm=False)
    assert out.outputs[0].token_ids == [42] * 5


def test_prompt_logprobs_agree_with_sampled_logprobs(tiny_llm, tokenizer, monkeypatch):
    ids = tokenizer.encode(PROMPT)
    [scored] = tiny_llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1, prompt_logprobs=2),
                                 use_tqdm=False)
    lps = scored.prompt_logprobs
    monkeypatch.setattr(sampler, "PROMPT_LOGPROBS_SLICE", 5)  # scored 5 positions at a time: the same
    [sliced] = tiny_llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1, prompt_logprobs=2),
                                 use_tqdm=False)
    assert len(sliced.prompt_logprobs) == len(lps) and sliced.prompt_logprobs[0] is None
    for a, b in zip(sliced.prompt_logprobs[1:], lps[1:]):
        assert a.keys() == b.keys() and all(a[t] == pytest.approx(b[t], abs=1e-5) for t in a)
    assert len(lps) == len(ids) and lps[0] is None
    assert all(ids[i] in lps[i] and 2 <= len(lps[i]) <= 3 for i in range(1, len(ids)))
    # The logprob of prompt token i is that of sampling it after the first i tokens.
    for i in (1, 17, len(ids) - 1):
        [step] = tiny_llm.generate({"prompt_token_ids": ids[:i]},
                                   SamplingParams(temperature=0, max_tokens=1, logprobs=20), use_tqdm=False)
        top = step.outputs[0].logprobs[0]
        if ids[i] in top:
            assert lps[i][ids[i]] == pytest.approx(top[ids[i]], abs=1e-4)
        assert max(lps[i].values()) == pytest.approx(max(top.values()), abs=1e-4)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_structured_outputs_follow_their_grammar(device, tiny_llm, tiny_model, assert_idle):
    """On a GPU too: the mask is applied on the device, after the decode graphs."""
    llm = tiny_llm if device == "cpu" else LLM(tiny_model, device="cuda", dtype="float32", num_kv_blocks=64, quiet=True)
    schema = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                               "b": {"enum": ["x", "y"]}}, "required": ["a", "b"]}
    kinds = [
        (StructuredOutputsParams(json=schema, disable_any_whitespace=True),
         lambda t: jsonschema.validate(json.loads(t), schema) is None),
        (StructuredOutputsParams(regex=r"[0-9]{3}-[a-z]{2}"), lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2}", t)),
        (StructuredOutputsParams(choice=["red", "green"]), lambda t: t in ("red", "green")),
        (StructuredOutputsParams(grammar='root ::= "(" [a-c]+ ")"'), lambda t: re.fullmatch(r"\([a-c]+\)", t)),
    ]
    # The tiny model's weights are random: whatever it picks, the grammar decides what it may pick.
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=40, n=2, structured_outputs=s)
              for i, (s, _) in enumerate(kinds)]
    outs = llm.generate([PROMPT] * len(kinds), params, use_tqdm=False)
    for (_, check), out in zip(kinds, outs):
        for choice in out.outputs:
            assert choice.finish_reason == "stop" and check(choice.text), choice
    assert_idle(llm)


def test_a_server_prepares_the_grammar_compiler_at_start(tiny_model):
    """`martlet serve`'s engine core loads xgrammar and makes its compiler before it takes requests, so
    the first structured request does not stall the step loop. (A fresh engine: the shared one has
    compiled grammars already.)"""
    engine = LLM(tiny_model, device="cpu", dtype="float32", quiet=True).engine
    assert engine.structured is None
    engine.prepare_structured_outputs()
    engine.structured.pool.submit(lambda: None).result(timeout=60)  # the worker is done with what came before
    assert engine.structured.compiler is not None


def test_a_compiling_grammar_does_not_hold_up_the_batch(tiny_llm, assert_idle):
    engine = tiny_llm.engine
    structured = engine._structured()
    compile_grammar, gate = structured._compile, threading.Event()
    structured._compile = lambda params: gate.wait() and compile_grammar(params)
    try:
        schema = {"type": "object", "properties": {"slow": {"type": "boolean"}}, "required": ["slow"]}
        waiting = engine.add_request([5, 6, 7], SamplingParams(
            max_tokens=20, structured_outputs=StructuredOutputsParams(json=schema, disable_any_whitespace=True)))
        plain = engine.add_request([5, 6, 7], SamplingParams(max_tokens=3, ignore_eos=True))
        finished = set()
        while plain not in finished:
            finished |= {out.request_id for out in engine.step("final")}
        assert waiting not in finished and engine.waiting_for_grammar  # still compiling, never scheduled
        gate.set()
        while engine.has_unfinished_requests():
            for out in engine.step("final"):
                assert json.loads(out.outputs[0].text)["slow"] in (True, False)
                finished.add(out.request_id)
        assert waiting in finished
    finally:
        structured._compile = compile_grammar
    assert_idle(tiny_llm)


@pytest.mark.parametrize("kwargs, message", [
    ({"json": {"type": "objec"}}, "Unsupported type"),
    ({"regex": "a(b"}, "not closed"),
    ({"grammar": "root ::= undefined_rule"}, "not defined"),
    ({"choice": []}, "exactly one"),
    ({"json": "{not json"}, "not valid JSON"),
    ({"json": {"type": "object"}, "regex": "a"}, "exactly one"),
])
def test_bad_grammar_is_a_value_error_that_says_why(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StructuredOutputsParams(**kwargs)


@pytest.mark.parametrize("extra", [{"min_tokens": 3}, {"ignore_eos": True}])
def test_nothing_may_keep_a_grammar_from_ending(extra):
    with pytest.raises(ValueError, match="grammar decides where the output ends"):
        SamplingParams(structured_outputs=StructuredOutputsParams(choice=["a"]), **extra)
