"""Speculative decoding with prompt lookup (n-gram) or a draft model is lossless: greedy tokens are the
ones decoding one at a time gives (and Hugging Face's), and sampled tokens follow the same distribution.

The tiny random model repeats itself within a few tokens, so proposals from its own output get
accepted; each test asserts that some were. A draft model that is the target itself proposes what
the target will pick (every guess accepted); another random model mostly does not.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
import transformers

from martlet import LLM, SamplingParams
from martlet.cli import build_parser, main
from martlet.config import EngineArgs, SpeculativeConfig
from martlet.engine.cuda_graphs import VerifyGraphs
from martlet.engine.sequence import Sequence
from martlet.engine.speculative import MAX_SPECULATIVE_BATCH, NgramProposer, accepted_prefix, find_continuation
from martlet.layers.sampler import Sampler
from martlet.sampling_params import StructuredOutputsParams
from martlet.testing import make_tiny_model

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
TEMPERATURE = 0.03
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def repeating_prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    """Prompts of 5 to 70 tokens, each a random phrase said several times."""
    rng = random.Random(seed)
    prompts = []
    for length, period in [(5, 2), (17, 5), (33, 8), (48, 3), (70, 16)]:
        phrase = [rng.randrange(3, vocab) for _ in range(period)]
        prompts.append((phrase * length)[:length])
    return prompts


def draft_config(path, k: int = 3) -> dict:
    return {"model": str(path), "num_speculative_tokens": k}


def token_ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def acceptance(outputs) -> int:
    return sum(o.metrics.num_accepted_tokens for o in outputs)


@pytest.fixture(scope="module")
def plain_llm(tiny_model):
    return LLM(tiny_model, device="cpu", dtype="float32", quiet=True)


@pytest.fixture(scope="module")
def spec_llm(tiny_model):
    return LLM(tiny_model, device="cpu", dtype="float32", quiet=True, speculative_config=NGRAM)


@pytest.fixture(scope="module")
def draft_llm(tiny_model):
    """The target drafting for itself."""
    return LLM(tiny_model, device="cpu", dtype="float32", quiet=True, speculative_config=draft_config(tiny_model))


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("draft") / "model", "llama", seed=1)


@pytest.fixture(scope="module")
def hf_reference(tiny_model):
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    prompts = repeating_prompts(hf.config.vocab_size)
    with torch.no_grad():
        expected = [hf.generate(torch.tensor([p]), max_new_tokens=GREEDY.max_tokens, do_sample=False,
                                min_new_tokens=GREEDY.max_tokens, pad_token_id=0)[0, len(p):].tolist()
                    for p in prompts]
    return prompts, expected


# ---- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize("config, message", [
    ({"method": "medusa", "num_speculative_tokens": 2}, "needs .model."),
    ({"method": "draft_model", "num_speculative_tokens": 2}, "needs 'model'"),
    ({"model": "draft", "num_speculative_tokens": 2, "prompt_lookup_max": 3}, "unknown keys"),
    ({"model": "draft"}, "num_speculative_tokens must be an integer >= 1"),
    ({"method": "lookahead", "num_speculative_tokens": 2}, "method must be one of"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens must be an integer >= 1"),
    ({"method": "ngram"}, "num_speculative_tokens must be an integer >= 1"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2},
     "prompt_lookup_min"),
    ({"method": "ngram", "num_speculative_tokens": 2, "lookup": 3}, "unknown keys"),
])
def test_a_bad_config_says_what_is_supported(config, message):
    with pytest.raises(ValueError, match=message):
        SpeculativeConfig.from_dict(config)


def test_the_lookup_bounds_default_to_each_other():
    assert SpeculativeConfig.from_dict({"num_speculative_tokens": 3, "prompt_lookup_max": 4}) == \
        SpeculativeConfig(num_speculative_tokens=3, prompt_lookup_max=4, prompt_lookup_min=4)


def test_the_flag_takes_json():
    argv = ["generate", "--prompt", "x", "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}']
    args = EngineArgs.from_cli_args(build_parser().parse_args(argv))
    assert args.speculative_config == {"method": "ngram", "num_speculative_tokens": 3}


def test_a_bad_config_fails_at_load(tiny_model):
    with pytest.raises(ValueError, match="method must be one of"):
        LLM(tiny_model, device="cpu", speculative_config={"method": "lookahead", "num_speculative_tokens": 2})


def test_a_draft_model_needs_the_same_vocabulary(tiny_model, tmp_path):
    draft = make_tiny_model(tmp_path / "draft", "llama", with_tokenizer=False)  # 4096 tokens
    with pytest.raises(ValueError, match="vocabulary of 4096 tokens"):
        LLM(tiny_model, device="cpu", quiet=True, speculative_config=draft_config(draft))


# ---- the pieces ------------------------------------------------------------------------------


def test_the_longest_earlier_ngram_proposes_what_followed_it():
    tokens = np.array([1, 2, 3, 9, 9, 7, 2, 3, 4, 5, 6, 7, 2, 3])
    assert find_continuation(tokens, 3, 1, 3) == [4, 5, 6]  # "7 2 3" at 5..7 beats the shorter "2 3" at 1..2
    assert find_continuation(tokens, 3, 1, 2) == [4, 5, 6]  # the latest "2 3"
    assert find_continuation(tokens, 9, 1, 2) == [9, 9, 7, 2, 3, 4, 5, 6, 7]  # the latest that 9 tokens follow
    assert find_continuation(tokens, 12, 1, 2) == [9, 9, 7, 2, 3, 4, 5, 6, 7, 2, 3]  # none: the earliest
    assert find_continuation(np.array([8, 5, 5, 5, 5, 5, 5]), 3, 1, 3) == [5, 5, 5]  # not the 5 at the end alone
    assert find_continuation(np.array([1, 2, 3, 4]), 3, 1, 3) == []


def test_the_lookup_agrees_with_a_plain_search():
    def plain_search(tokens: list[int], k: int, min_n: int, max_n: int) -> list[int]:
        for n in range(min(max_n, len(tokens) - 1), min_n - 1, -1):
            starts = [s for s in range(len(tokens) - n) if tokens[s : s + n] == tokens[-n:]]
            if starts:
                followed_by_k = [s for s in starts if s + n + k <= len(tokens)]
                start = followed_by_k[-1] if followed_by_k else starts[0]
                return tokens[start + n : start + n + k]
        return []

    rng = random.Random(0)
    for _ in range(2000):
        tokens = [rng.randrange(rng.choice([2, 3, 50])) for _ in range(rng.randrange(1, 30))]
        k, min_n = rng.randrange(1, 6), rng.randrange(1, 4)
        max_n = rng.randrange(min_n, 6)
        assert find_continuation(np.array(tokens), k, min_n, max_n) == plain_search(tokens, k, min_n, max_n)


def test_the_ngram_proposer_keeps_each_sequence_as_an_array():
    """Grown by appended tokens and by the last token's replacement (a placeholder sampled meanwhile)."""
    proposer = NgramProposer(SpeculativeConfig(method="ngram", num_speculative_tokens=2), max_model_len=100)
    seq = Sequence("r", [7, 1, 2], SamplingParams(), eos_token_ids=[0])
    rng = random.Random(0)
    for _ in range(40):
        assert proposer._tokens(seq).tolist() == seq.token_ids
        seq.token_ids[-1:] = [rng.randrange(5) for _ in range(rng.randrange(1, 4))]
    assert len(proposer.arrays) == 1
    del seq
    assert len(proposer.arrays) == 0  # a finished sequence's array goes with it


def test_the_accepted_prefix_ends_at_the_first_disagreement():
    assert accepted_prefix([5, 6, 7], [5, 6, 8, 1]) == [5, 6, 8]
    assert accepted_prefix([5, 6, 7], [5, 6, 7, 1]) == [5, 6, 7, 1]
    assert accepted_prefix([5, 6, 7], [4, 6, 7, 1]) == [4]
    assert accepted_prefix([], [3]) == [3]


@pytest.mark.parametrize("top_k", [-1, 3])
def test_rejection_sampling_keeps_the_target_distribution(top_k):
    """Many rows of one small distribution, each verifying one draft: the tokens that come out are
    distributed as the target (top-k filtered and renormalized), whatever the draft."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    target = torch.softmax(logits, -1)
    if top_k > 0:
        target = torch.where(target >= target.topk(top_k).values[-1], target, 0.0)
        target /= target.sum()
    rows = 100_000
    seq = Sequence("r", [1], SamplingParams(temperature=1.0, top_k=top_k), eos_token_ids=[])
    for draft in (0, 3, 4):
        tokens = Sampler(torch.device("cpu"), seed=draft)(logits.repeat(rows, 1), [seq] * rows,
                                                          torch.full((rows,), draft)).token_ids
        observed = torch.bincount(tokens, minlength=5).double() / rows
        assert (observed - target.double()).abs().max() < 0.006, (draft, observed, target)


# ---- greedy: token-identical -----------------------------------------------------------------


@pytest.mark.parametrize("llm_name", ["spec_llm", "draft_llm"])
def test_greedy_matches_hf_and_accepts_proposals(llm_name, request, hf_reference, assert_idle):
    spec_llm = request.getfixturevalue(llm_name)
    prompts, expected = hf_reference
    outs = spec_llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    assert token_ids(outs) == expected
    assert acceptance(outs) > 0
    metrics = max((o.metrics for o in outs), key=lambda m: m.num_accepted_tokens)
    assert 0 < metrics.acceptance_rate <= 1 and metrics.mean_accepted_length > 1
    assert_idle(spec_llm)


def test_a_draft_that_is_the_target_has_every_guess_accepted(draft_llm, hf_reference):
    prompts, expected = hf_reference
    outs = draft_llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    assert token_ids(outs) == expected
    assert all(o.metrics.num_draft_tokens > 0 and o.metrics.acceptance_rate == 1.0 for o in outs)


def test_a_different_draft_is_mostly_rejected_and_changes_nothing(tiny_model, other_model, hf_reference):
    """A budget of 40 tokens a step: the draft catches up on the longer prompts in two passes."""
    prompts, expected = hf_reference
    llm = LLM(tiny_model, device="cpu", dtype="float32", quiet=True, max_num_batched_tokens=40,
              speculative_config=draft_config(other_model))
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    assert token_ids(outs) == expected
    drafts = sum(o.metrics.num_draft_tokens for o in outs)
    assert drafts > 0 and acceptance(outs) < drafts / 4


@pytest.mark.parametrize("config", ["ngram", "self", "other"])
def test_greedy_matches_hf_under_preemption(config, tiny_model, other_model, hf_reference):
    """6 blocks (96 tokens) cannot hold the batch: sequences are preempted and recomputed (a draft
    model's K/V with them)."""
    prompts, expected = hf_reference
    spec = {"ngram": NGRAM, "self": draft_config(tiny_model), "other": draft_config(other_model)}[config]
    llm = LLM(tiny_model, device="cpu", dtype="float32", quiet=True, num_kv_blocks=6, speculative_config=spec)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    assert sum(o.metrics.num_preemptions for o in outs) > 0
    assert token_ids(outs) == expected
    assert acceptance(outs) > 0 or config == "other"
    assert llm.engine.block_manager.num_free_blocks == 6


@pytest.mark.parametrize("llm_name", ["spec_llm", "draft_llm"])
def test_speculating_and_plain_requests_share_a_batch(llm_name, request, plain_llm, hf_reference, assert_idle):
    """Penalties and logprobs need one row per step, so those requests decode one token at a time
    in the same batches as the speculating ones (and two choices of one prompt, forked, speculate)."""
    spec_llm = request.getfixturevalue(llm_name)
    prompts, _ = hf_reference
    params = [GREEDY, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, presence_penalty=0.5),
              SamplingParams(n=2, temperature=0, max_tokens=24, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2), GREEDY]
    requests = [{"prompt_token_ids": p} for p in prompts]
    outs = spec_llm.generate(requests, params, use_tqdm=False)
    plain = plain_llm.generate(requests, params, use_tqdm=False)
    assert [[c.token_ids for c in o.outputs] for o in outs] == [[c.token_ids for c in o.outputs] for o in plain]
    for row, plain_row in zip(outs[3].outputs[0].logprobs, plain[3].outputs[0].logprobs, strict=True):
        assert row.keys() == plain_row.keys()
        assert list(row.values()) == pytest.approx(list(plain_row.values()), abs=1e-5)
    assert outs[1].metrics.num_draft_tokens == outs[3].metrics.num_draft_tokens == 0
    assert acceptance(outs) > 0
    assert_idle(spec_llm)


def test_no_speculation_above_the_batch_limit(spec_llm, plain_llm, hf_reference):
    prompts, _ = hf_reference
    requests = [{"prompt_token_ids": prompts[i % len(prompts)]} for i in range(MAX_SPECULATIVE_BATCH + 1)]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    outs = spec_llm.generate(requests, params, use_tqdm=False)
    assert token_ids(outs) == token_ids(plain_llm.generate(requests, params, use_tqdm=False))
    assert sum(o.metrics.num_draft_tokens for o in outs) == 0


# ---- stops inside an accepted run ------------------------------------------------------------


@pytest.fixture(scope="module")
def accepted_run(spec_llm):
    """A prompt whose first verification step accepts two proposals or more, and those two tokens.

    Streaming a prompt shows the tokens each step made; a step that made three or more accepted
    two proposals. Resuming from the prompt plus the output before that step's input token makes
    that step the first decode step, so the accepted tokens are the first of their kind in the output.
    """
    rng = random.Random(1)
    for period in [2, 3, 4, 4]:
        prompt = [rng.randrange(3, 49000) for _ in range(period)] * 10
        steps, seen = [], 0
        for out in spec_llm.stream({"prompt_token_ids": prompt}, GREEDY):
            steps.append(out.outputs[0].token_ids[seen:])
            seen += len(steps[-1])
        output = [t for step in steps for t in step]
        for i, step in enumerate(steps):
            start = sum(map(len, steps[:i]))  # the step's first token
            if len(step) >= 3 and step[1] not in (output[start - 1], step[0]):  # first occurs in the run
                # Its prefill makes output[start - 1]; its first decode, the run.
                return prompt + output[: start - 1], step[1]
    raise AssertionError("no step accepted two proposals")


def _same_outputs(spec_llm, plain_llm, prompt, params):
    spec = spec_llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
    plain = plain_llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
    for field in ("token_ids", "text", "finish_reason", "stop_reason"):
        assert getattr(spec.outputs[0], field) == getattr(plain.outputs[0], field), field
    return spec


def test_a_stop_token_inside_an_accepted_run_ends_there(spec_llm, plain_llm, accepted_run, assert_idle):
    prompt, stop = accepted_run
    params = SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[stop])
    out = _same_outputs(spec_llm, plain_llm, prompt, params)
    assert out.outputs[0].token_ids[-1] == stop and len(out.outputs[0].token_ids) == 3
    assert out.metrics.num_accepted_tokens >= 2
    assert_idle(spec_llm)


def test_eos_inside_an_accepted_run_ends_there(spec_llm, plain_llm, accepted_run, monkeypatch):
    prompt, stop = accepted_run
    for llm in (spec_llm, plain_llm):
        monkeypatch.setattr(llm.engine, "eos_token_ids", [stop])
    out = _same_outputs(spec_llm, plain_llm, prompt, SamplingParams(temperature=0, max_tokens=24))
    assert out.outputs[0].finish_reason == "stop" and len(out.outputs[0].token_ids) == 3


def test_a_stop_string_inside_an_accepted_run_ends_there(spec_llm, plain_llm, accepted_run, tokenizer):
    prompt, stop = accepted_run
    text = tokenizer.decode([stop]).strip()
    out = _same_outputs(spec_llm, plain_llm, prompt, SamplingParams(temperature=0, max_tokens=24, stop=[text]))
    assert out.outputs[0].finish_reason == "stop" and len(out.outputs[0].token_ids) <= 3


@pytest.mark.parametrize("max_tokens", [2, 3, 4])
def test_max_tokens_inside_an_accepted_run(spec_llm, plain_llm, accepted_run, max_tokens):
    prompt, _ = accepted_run
    out = _same_outputs(spec_llm, plain_llm, prompt, SamplingParams(temperature=0, max_tokens=max_tokens))
    assert len(out.outputs[0].token_ids) == max_tokens and out.outputs[0].finish_reason == "length"


def test_streaming_gets_several_tokens_a_step(spec_llm, accepted_run):
    prompt, _ = accepted_run
    sizes, seen = [], 0
    for out in spec_llm.stream({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=8)):
        sizes.append(len(out.outputs[0].token_ids) - seen)
        seen += sizes[-1]
    assert sizes[0] == 1 and max(sizes) >= 3 and seen == 8


# ---- sampling: the same distribution ---------------------------------------------------------


@pytest.mark.parametrize("llm_name", ["spec_llm", "draft_llm"])
def test_sampled_tokens_follow_the_same_distribution(llm_name, request, plain_llm, accepted_run):
    """Seeded requests from a point where greedy decoding accepts a run: at a low temperature the
    model mostly agrees with the proposals, sometimes not. Whether the second and third tokens (the
    verified ones) are the greedy ones must be distributed alike with and without speculation."""
    spec_llm = request.getfixturevalue(llm_name)
    prompt, _ = accepted_run
    request = {"prompt_token_ids": prompt}
    greedy = plain_llm.generate(request, SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)[0]
    params = [SamplingParams(temperature=TEMPERATURE, max_tokens=3, seed=seed, ignore_eos=True) for seed in range(320)]

    def tally(llm: LLM) -> tuple[dict[tuple[bool, ...], float], int]:
        counts: dict[tuple[bool, ...], float] = {}
        accepted = 0
        for chunk in range(0, len(params), MAX_SPECULATIVE_BATCH):  # small enough batches to speculate
            batch = params[chunk : chunk + MAX_SPECULATIVE_BATCH]
            for out in llm.generate([request] * len(batch), batch, use_tqdm=False):
                key = tuple(t == g for t, g in zip(out.outputs[0].token_ids[1:], greedy.outputs[0].token_ids[1:]))
                counts[key] = counts.get(key, 0) + 1 / len(params)
                accepted += out.metrics.num_accepted_tokens
        return counts, accepted

    spec, accepted = tally(spec_llm)
    plain, _ = tally(plain_llm)
    assert accepted > 0
    assert 0.1 < spec.get((True, True), 0) < 0.9, spec  # proposals are both accepted and rejected
    total_variation = sum(abs(spec.get(k, 0) - plain.get(k, 0)) for k in spec.keys() | plain.keys()) / 2
    # 320 seeds leave a total variation of about 0.05 by chance; accepting every proposal gives 0.38.
    # The precise check of the rule is test_rejection_sampling_keeps_the_target_distribution.
    assert total_variation < 0.15, (spec, plain)


# ---- the real default model ------------------------------------------------------------------


def test_the_default_model_repeating_a_passage_is_unchanged_and_accepts_proposals():
    from martlet.models.gguf import default_model_path

    passage = "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step."
    messages = [{"role": "user", "content": f"Repeat this passage exactly, word for word:\n\n{passage}"}]
    params = SamplingParams(temperature=0, max_tokens=20)
    outputs = [LLM(str(default_model_path()), device="cpu", quiet=True, speculative_config=config)
               .chat(messages, params, use_tqdm=False)[0] for config in (None, NGRAM)]
    plain, spec = (out.outputs[0] for out in outputs)
    assert spec.token_ids == plain.token_ids and spec.text == plain.text
    assert plain.text.startswith("The quick brown fox")
    assert outputs[1].metrics.num_accepted_tokens > 0


def test_prefix_cache_hits_keep_output(spec_llm, hf_reference):
    """Blocks are hashed only over verified tokens, so the second time the same prompts (and the
    outputs, as a prompt) read the cache and still give Hugging Face's tokens."""
    prompts, expected = hf_reference
    spec_llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    hits_before = spec_llm.engine.block_manager.num_hit_tokens
    outs = spec_llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    assert token_ids(outs) == expected
    assert spec_llm.engine.block_manager.num_hit_tokens > hits_before
    again = spec_llm.generate([{"prompt_token_ids": p + e[:-1]} for p, e in zip(prompts, expected)],
                              SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in again] == [e[-1:] for e in expected]


def test_bench_reports_acceptance(tiny_model, tmp_path, capsys):
    result_file = tmp_path / "result.json"
    with pytest.raises(SystemExit) as done:
        main(["bench", "throughput", "--model", str(tiny_model), "--num-prompts", "4", "--input-len", "16",
              "--output-len", "24", "--device", "cpu", "--dtype", "float32", "--quiet", "--json", str(result_file),
              "--speculative-config", json.dumps(NGRAM)])
    assert done.value.code == 0
    result = json.loads(result_file.read_text())
    assert result["output_tokens"] == 4 * 24
    assert 0 < result["spec_accepted_tokens"] <= result["spec_draft_tokens"]
    assert "proposed tokens accepted" in capsys.readouterr().out


def test_the_server_streams_the_same_text_and_counts_acceptance(tiny_model, plain_llm, accepted_run, tmp_path):
    from test_server import API_KEY, MODEL_NAME, Server

    prompt, _ = accepted_run
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    expected = plain_llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0].outputs[0].text
    server = Server(tiny_model, tmp_path / "server.log", "--api-key", API_KEY, "--speculative-config",
                    json.dumps(NGRAM))
    try:
        chunks = server.client().completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=16, temperature=0,
                                                    stream=True, extra_body={"ignore_eos": True})
        assert "".join(chunk.choices[0].text for chunk in chunks) == expected
        metrics = server.metrics()
        assert 0 < metrics["martlet_spec_decode_num_accepted_tokens_total"] <= \
            metrics["martlet_spec_decode_num_draft_tokens_total"]
    finally:
        assert server.stop() == 0


def test_the_triton_backend_verifies_alike(tiny_model, hf_reference, monkeypatch):
    """The Triton kernels (Triton's interpreter on a CPU): verification chunks attend to their cached
    context, and rejected proposals' K/V, written to the cache, are overwritten (block 8, so runs
    cross blocks); a draft model's steps run the same kernels. Against the same backend without
    speculation, so that a GPU compares like with like. With n-gram, verification steps go through
    VerifyGraphs' padded static batch (3 sequences in a rung of 4; eager steps on a CPU, where
    nothing captures them; a GPU captures its own)."""
    prompts, _ = hf_reference
    device = "cuda" if torch.cuda.is_available() else "cpu"
    requests = [{"prompt_token_ids": p} for p in prompts[1:4]]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs, graph_steps = [], []
    for config in (None, NGRAM, draft_config(tiny_model)):
        # A pool of its own size: on a GPU, the engine before this one still holds its pool here.
        llm = LLM(tiny_model, device=device, dtype="float32", attention_backend="triton", block_size=8, quiet=True,
                  num_kv_blocks=128, speculative_config=config)
        runner = llm.engine.runner
        if config is NGRAM and runner.verify_graphs is None:
            runner.verify_graphs = VerifyGraphs(runner.model, 4, NGRAM["num_speculative_tokens"] + 1,
                                                llm.engine.config.max_model_len, 8, runner.device)
        if runner.verify_graphs is not None:
            run = runner.verify_graphs.run
            monkeypatch.setattr(runner.verify_graphs, "run", lambda *args, run=run: graph_steps.append(1) or run(*args))
        outs.append(llm.generate(requests, params, use_tqdm=False))
    for spec in outs[1:]:
        assert token_ids(spec) == token_ids(outs[0])
        assert acceptance(spec) > 0
    assert graph_steps


def test_an_abort_while_proposals_are_verified_frees_everything(spec_llm, accepted_run, assert_idle):
    prompt, _ = accepted_run
    engine = spec_llm.engine
    request_id = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=24))
    while not (engine.in_flight is not None and engine.in_flight.verifies):
        engine.step()
    engine.abort_request(request_id)
    while engine.has_unfinished_requests():
        engine.step()
    assert_idle(spec_llm)


def test_every_decode_step_speculates_while_proposals_are_found(spec_llm):
    """The tiny model answers a run of one token with a run of another: after its first two tokens every
    step finds a proposal, and every step verifies one (the step after a verification included)."""
    steps = list(spec_llm.stream({"prompt_token_ids": [1465] * 40}, SamplingParams(temperature=0, max_tokens=24)))
    assert len(set(steps[-1].outputs[0].token_ids)) == 1
    assert steps[-1].metrics.num_spec_steps >= len(steps) - 3  # all but the prefill and the first two decodes


def test_a_grammar_beside_proposals_in_one_batch(tiny_model, plain_llm):
    """A request with a grammar never speculates, but its batch-mates' proposals give the batch more
    sampled rows than max_num_seqs: the grammar's bitmask must cover all of them."""
    llm = LLM(tiny_model, device="cpu", dtype="float32", quiet=True, max_num_seqs=2, speculative_config=NGRAM)
    prompt = "one two three four one two three four one two three four one two three"
    choice = SamplingParams(temperature=0, max_tokens=24, structured_outputs=StructuredOutputsParams(choice=["red"]))
    spec, constrained = llm.generate([prompt, prompt], [GREEDY, choice], use_tqdm=False)
    assert spec.metrics.num_draft_tokens > 0 and constrained.outputs[0].text == "red"
    assert token_ids([spec]) == token_ids(plain_llm.generate([prompt], GREEDY, use_tqdm=False))
