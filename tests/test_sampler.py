"""The sampler on hand-made logits (statistically, with fixed seeds), and sampling at the engine
level on the tiny model: seeded reproducibility, stop conditions and the RequestOutput fields."""

from __future__ import annotations

import math

import pytest
import torch

from martlet.engine.model_runner import LaunchedStep
from martlet.engine.sequence import Sequence
from martlet.layers.sampler import Sampler, apply_penalties, filter_probs, mask_stop_tokens
from martlet.sampling_params import SamplingParams

CPU = torch.device("cpu")
N = 20_000  # draws per distribution: frequency standard error <= 0.0036


def make_seq(params: SamplingParams, prompt=(1, 2, 3), outputs=(), eos=(0,), seed=None, rid="r") -> Sequence:
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    seq = Sequence(rid, list(prompt), params, list(eos), generator=generator)
    for t in outputs:
        seq.append_token(t)
    return seq


def draw(logits_row: list[float], params: SamplingParams, n: int = N, seed: int = 0) -> torch.Tensor:
    """n independent samples from one row of logits (n identical rows in one batch)."""
    sampler = Sampler(CPU, seed)
    seq = make_seq(params, eos=())
    logits = torch.tensor([logits_row]).repeat(n, 1)
    return sampler(logits, [seq] * n).token_ids


def frequencies(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.bincount(tokens, minlength=vocab).double() / len(tokens)


def assert_matches(freq: torch.Tensor, probs: torch.Tensor, n: int = N) -> None:
    """Every token's frequency within 5 standard errors of its probability (zeros exactly zero)."""
    probs = probs.double()
    bound = 5 * torch.sqrt(probs * (1 - probs) / n) + 1e-9
    assert torch.all((freq - probs).abs() <= bound), (freq.tolist(), probs.tolist())
    assert torch.all(freq[probs == 0] == 0)


LOGITS = [0.3, 2.0, -1.0, 1.5, -3.0, 1.0, -0.5, 0.0]  # deliberately not sorted
V = len(LOGITS)
RANKED = sorted(range(V), key=lambda t: -LOGITS[t])  # token ids, best first


# ---- temperature, greedy --------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_sampling_follows_softmax(temperature):
    freq = frequencies(draw(LOGITS, SamplingParams(temperature=temperature)), V)
    assert_matches(freq, torch.softmax(torch.tensor(LOGITS) / temperature, -1))


def test_temperature_changes_the_distribution():
    # The bound above is tight enough to tell T=0.5 from T=1: this guards the test itself.
    freq = frequencies(draw(LOGITS, SamplingParams(temperature=0.5)), V)
    with pytest.raises(AssertionError):
        assert_matches(freq, torch.softmax(torch.tensor(LOGITS), -1))


def test_greedy_is_argmax_alone_and_mixed_with_sampled_rows():
    torch.manual_seed(0)
    logits = torch.randn(64, 100)
    greedy = SamplingParams(temperature=0.0)
    hot = SamplingParams(temperature=5.0)
    seqs = [make_seq(greedy if i % 2 == 0 else hot, rid=str(i)) for i in range(64)]
    out = Sampler(CPU, 0)(logits, seqs).token_ids
    argmax = logits.argmax(-1)
    assert torch.equal(out[0::2], argmax[0::2])
    assert not torch.equal(out[1::2], argmax[1::2])  # the hot rows really sample
    only_greedy = Sampler(CPU, 0)(logits, [make_seq(greedy)] * 64).token_ids
    assert torch.equal(only_greedy, argmax)


def test_greedy_ignores_top_k_top_p_min_p():
    logits = torch.tensor([[0.1, 3.0, 2.9, -1.0]])
    params = SamplingParams(temperature=0.0, top_k=3, top_p=0.1, min_p=0.9)
    mixed = [make_seq(params), make_seq(SamplingParams(temperature=1.0))]
    assert Sampler(CPU, 0)(logits.repeat(2, 1), mixed).token_ids[0].item() == 1


# ---- top-k, top-p, min-p --------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_top_k_stays_in_the_top_k_and_reaches_all_of_them(k):
    tokens = draw(LOGITS, SamplingParams(temperature=1.0, top_k=k))
    top = RANKED[:k]
    assert set(tokens.unique().tolist()) == set(top)
    kept = torch.zeros(V)
    kept[top] = torch.softmax(torch.tensor(LOGITS), -1)[top]
    assert_matches(frequencies(tokens, V), kept / kept.sum())


def test_top_k_larger_than_vocab_is_no_filter():
    freq = frequencies(draw(LOGITS, SamplingParams(temperature=1.0, top_k=1000)), V)
    assert_matches(freq, torch.softmax(torch.tensor(LOGITS), -1))


def _logits_of(probs: list[float]) -> list[float]:
    return [math.log(p) for p in probs]


@pytest.mark.parametrize(
    ("top_p", "nucleus"),
    [(0.35, 1), (0.45, 2), (0.75, 3), (0.89, 3), (0.93, 4), (1.0, 5)],
)
def test_top_p_keeps_the_smallest_nucleus(top_p, nucleus):
    probs = [0.4, 0.3, 0.2, 0.06, 0.04]  # cumulative 0.4, 0.7, 0.9, 0.96, 1.0
    tokens = draw(_logits_of(probs), SamplingParams(temperature=1.0, top_p=top_p))
    kept = torch.tensor(probs[:nucleus] + [0.0] * (5 - nucleus))
    assert set(tokens.unique().tolist()) == set(range(nucleus))
    assert_matches(frequencies(tokens, 5), kept / kept.sum())


def test_top_p_applies_after_top_k_renormalization():
    # top_k=3 keeps 0.4/0.3/0.2, renormalized to 4/9, 3/9, 2/9; 4/9 + 3/9 = 0.78 >= 0.75, so the
    # nucleus is tokens 0 and 1. (Measured on the unrenormalized probabilities, 0.4 + 0.3 = 0.7
    # would fall short and token 2 would stay.)
    probs = [0.4, 0.3, 0.2, 0.06, 0.04]
    tokens = draw(_logits_of(probs), SamplingParams(temperature=1.0, top_k=3, top_p=0.75))
    assert set(tokens.unique().tolist()) == {0, 1}
    assert_matches(frequencies(tokens, 5), torch.tensor([4 / 7, 3 / 7, 0, 0, 0]))


@pytest.mark.parametrize("min_p", [0.1, 0.2, 0.5, 0.9])
def test_min_p_drops_tokens_under_min_p_times_max(min_p):
    probs = torch.softmax(torch.tensor(LOGITS), -1)
    keep = probs >= min_p * probs.max()
    tokens = draw(LOGITS, SamplingParams(temperature=1.0, min_p=min_p))
    assert set(tokens.unique().tolist()) == set(keep.nonzero().flatten().tolist())
    kept = probs * keep
    assert_matches(frequencies(tokens, V), kept / kept.sum())


def test_filter_probs_boundaries_exact():
    """On exactly representable probabilities: top-p keeps the smallest prefix whose mass reaches
    top_p; min-p keeps a token exactly at min_p * max; the top token always survives."""
    p = torch.tensor([[0.5, 0.25, 0.125, 0.0625, 0.0625]] * 6)
    out = filter_probs(
        p,
        top_k=torch.tensor([-1, -1, -1, 2, -1, 1]),
        top_p=torch.tensor([0.75, 0.5, 1.0, 1.0, 1.0, 1.0]),
        min_p=torch.tensor([0.0, 0.0, 0.25, 0.0, 1.0, 0.0]),
    )
    expect = torch.tensor([
        [0.5, 0.25, 0, 0, 0],  # 0.5 + 0.25 reaches 0.75 exactly
        [0.5, 0, 0, 0, 0],  # 0.5 alone reaches 0.5
        [0.5, 0.25, 0.125, 0, 0],  # min_p floor 0.125 keeps 0.125, drops 0.0625
        [0.5, 0.25, 0, 0, 0],  # top_k=2
        [0.5, 0, 0, 0, 0],  # min_p=1 keeps only the max
        [0.5, 0, 0, 0, 0],  # top_k=1
    ])
    assert torch.equal(out, expect)


def test_filter_probs_keeps_the_top_token_with_tiny_top_p():
    p = torch.softmax(torch.randn(4, 30, generator=torch.Generator().manual_seed(1)), -1)
    out = filter_probs(p, torch.full((4,), -1), torch.full((4,), 1e-9), torch.zeros(4))
    assert torch.equal((out > 0).sum(-1), torch.ones(4, dtype=torch.long))
    assert torch.equal(out.argmax(-1), p.argmax(-1))


def test_filters_are_per_row():
    params = [
        SamplingParams(temperature=1.0, top_k=1),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=1.0, top_k=2),
        SamplingParams(temperature=1.0, min_p=0.99),
    ]
    reps = 500
    seqs = [make_seq(p, rid=str(i)) for i, p in enumerate(params) for _ in range(reps)]
    tokens = Sampler(CPU, 3)(torch.tensor([LOGITS] * len(seqs)), seqs).token_ids.view(len(params), reps)
    seen = [set(row.tolist()) for row in tokens]
    assert seen[0] == {RANKED[0]} and seen[3] == {RANKED[0]}
    assert seen[2] == set(RANKED[:2])
    assert len(seen[1]) >= 5


# ---- seeds ----------------------------------------------------------------------------------


def test_seeded_row_is_independent_of_batch_mates():
    torch.manual_seed(0)
    logits = torch.randn(5, 40)
    hot = SamplingParams(temperature=1.0)

    def run(position: int, sampler_seed: int, batch: int, steps: int = 30) -> list[int]:
        seqs = [make_seq(hot, rid=str(i), seed=(99 if i == 1 else None)) for i in range(batch)]
        seqs[position] = make_seq(hot, seed=1234)
        rows = logits[:batch].clone()
        rows[position] = logits[0]
        sampler = Sampler(CPU, sampler_seed)
        return [sampler(rows, seqs).token_ids[position].item() for _ in range(steps)]

    alone = run(0, 0, 1)
    assert run(0, 5, 3) == alone
    assert run(2, 7, 5) == alone
    assert run(4, 0, 5) == alone
    assert len(set(alone)) > 3  # it really samples


def test_different_seeds_differ_and_unseeded_rows_follow_the_sampler_seed():
    logits = torch.randn(1, 40, generator=torch.Generator().manual_seed(0))
    hot = SamplingParams(temperature=1.0)

    def tokens(seed, sampler_seed=0):
        seq = make_seq(hot, seed=seed)
        sampler = Sampler(CPU, sampler_seed)
        return [sampler(logits, [seq]).token_ids.item() for _ in range(30)]

    assert tokens(1) != tokens(2)
    assert tokens(1, sampler_seed=0) == tokens(1, sampler_seed=1)
    assert tokens(None, sampler_seed=0) == tokens(None, sampler_seed=0)
    assert tokens(None, sampler_seed=0) != tokens(None, sampler_seed=1)


# ---- penalties ------------------------------------------------------------------------------


def hand_penalties(logits: list[float], prompt, outputs, rep: float, presence: float, freq: float) -> list[float]:
    out = []
    for tok, x in enumerate(logits):
        if tok in prompt or tok in outputs:
            x = x / rep if x > 0 else x * rep
        count = list(outputs).count(tok)
        x -= freq * count
        if count:
            x -= presence
        out.append(x)
    return out


@pytest.mark.parametrize(
    ("rep", "presence", "freq"),
    [(1.3, 0.0, 0.0), (0.7, 0.0, 0.0), (1.0, 0.5, 0.0), (1.0, 0.0, 0.4), (1.5, -0.3, 0.6), (1.0, 2.0, -2.0)],
)
def test_apply_penalties_matches_hand_computation(rep, presence, freq):
    logits = [1.5, -0.5, 2.0, -1.2, 0.8, 0.0, 3.0, -2.5, 0.4, 1.1]
    rows = [
        ((1, 2, 2), (2, 3, 3, 3)),  # token 1 prompt only, 2 both, 3 output only
        ((6, 7), ()),  # prompt only: no presence/frequency
        ((0,), (4, 4, 9, 5, 0)),
    ]
    params = SamplingParams(repetition_penalty=rep, presence_penalty=presence, frequency_penalty=freq)
    seqs = [make_seq(params, prompt=p, outputs=o) for p, o in rows]
    got = apply_penalties(torch.tensor([logits] * 3), seqs)
    for i, (prompt, outputs) in enumerate(rows):
        want = hand_penalties(logits, prompt, outputs, rep, presence, freq)
        assert got[i].tolist() == pytest.approx(want, abs=1e-6), (i, got[i].tolist(), want)


def test_penalties_are_per_row_and_change_the_greedy_choice():
    logits = torch.tensor([[3.0, 2.5, 0.0, 0.0]] * 3)
    seqs = [
        make_seq(SamplingParams(temperature=0.0, repetition_penalty=2.0), prompt=(0,)),  # 3.0 -> 1.5
        make_seq(SamplingParams(temperature=0.0, frequency_penalty=0.3), prompt=(2,), outputs=(0, 0)),  # 2.4
        make_seq(SamplingParams(temperature=0.0), prompt=(0,), outputs=(0, 0)),  # no penalty
    ]
    assert Sampler(CPU, 0)(logits, seqs).token_ids.tolist() == [1, 1, 0]


# ---- min_tokens -----------------------------------------------------------------------------


def test_min_tokens_masks_eos_and_stop_token_ids():
    logits = torch.tensor([[0.0, 1.0, 0.5, 0.0, 0.0, 9.0, 0.0, 8.0]])  # EOS=5 best, stop id 7 next
    greedy = dict(temperature=0.0, stop_token_ids=[7], min_tokens=3)

    def pick(outputs, **extra):
        seq = make_seq(SamplingParams(**{**greedy, **extra}), outputs=outputs, eos=(5,))
        return Sampler(CPU, 0)(logits, [seq]).token_ids.item()

    assert pick(()) == 1
    assert pick((4, 4)) == 1  # 2 outputs < 3: still masked
    assert pick((4, 4, 4)) == 5  # min_tokens reached
    assert pick((), ignore_eos=True) == 5  # EOS ends nothing when ignored, so it is not masked
    assert pick((), ignore_eos=True, stop_token_ids=[5, 7]) == 1
    masked = mask_stop_tokens(logits, [make_seq(SamplingParams(**greedy), eos=(5,))])
    assert masked[0, 5] == -math.inf and masked[0, 7] == -math.inf
    assert torch.equal(masked[0, :5], logits[0, :5])
    assert logits[0, 5] == 9.0  # the caller's logits are not modified


def test_min_tokens_masking_when_sampling():
    params = SamplingParams(temperature=1.0, stop_token_ids=[2], min_tokens=2)
    seq = make_seq(params, eos=(0,))
    tokens = Sampler(CPU, 0)(torch.zeros(4000, 4), [seq] * 4000).token_ids
    assert set(tokens.tolist()) == {1, 3}


# ---- logprobs -------------------------------------------------------------------------------


def test_logprobs_hold_the_top_n_and_the_sampled_token():
    torch.manual_seed(0)
    rows, vocab = 400, 50
    logits = torch.randn(rows, vocab) * 2
    counts = [None, 0, 1, 3, 5]
    seqs = [
        make_seq(SamplingParams(temperature=2.0, logprobs=counts[i % 5]), rid=str(i)) for i in range(rows)
    ]
    out = Sampler(CPU, 0)(logits, seqs)
    reference = torch.log_softmax(logits, -1)  # of the raw logits, before temperature
    tokens, logprobs = LaunchedStep.start(seqs, out).results()
    assert logprobs is not None and len(logprobs) == rows
    outside = 0
    for i, (row, token) in enumerate(zip(logprobs, tokens)):
        n = counts[i % 5] or 0
        top = reference[i].topk(n).indices.tolist() if n else []
        assert set(row) == set(top) | {token}
        outside += token not in top
        for tok, value in row.items():
            assert value == pytest.approx(reference[i, tok].item(), abs=1e-5)
    assert outside > 50  # the "sampled token outside the top N" case was exercised


def test_logprobs_with_greedy_and_penalties_are_of_the_raw_logits():
    logits = torch.tensor([[2.0, 1.9, -1.0, 0.5]])
    seq = make_seq(SamplingParams(temperature=0.0, logprobs=2, repetition_penalty=4.0), prompt=(0,))
    out = Sampler(CPU, 0)(logits, [seq])
    assert out.token_ids.item() == 1  # the penalty moved the choice
    ref = torch.log_softmax(logits, -1)[0]
    _, logprobs = LaunchedStep.start([seq], out).results()
    assert logprobs[0] == pytest.approx({0: ref[0].item(), 1: ref[1].item()})


def test_no_logprobs_when_nobody_asks():
    seqs = [make_seq(SamplingParams(temperature=1.0)), make_seq(SamplingParams(temperature=0.0))]
    out = Sampler(CPU, 0)(torch.randn(2, 10), seqs)
    assert out.top_ids is None and LaunchedStep.start(seqs, out).results()[1] is None


# ---- engine level: seeds ----------------------------------------------------------------------

PROMPTS = ["Hello, my name is", "The capital of France", "Once upon a time", "1, 2, 3, 4,"]


def _gen(llm, prompts, params):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def test_seeded_request_is_reproducible_regardless_of_batch(tiny_llm, assert_idle):
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=8)
    other_seeded = SamplingParams(temperature=1.0, seed=7, max_tokens=6)
    unseeded = SamplingParams(temperature=1.0, max_tokens=8)
    greedy = SamplingParams(temperature=0.0, max_tokens=4)
    alone = _gen(tiny_llm, [PROMPTS[0]], seeded)[0]
    assert len(alone) == 8
    batch_a = _gen(tiny_llm, PROMPTS[1:] + PROMPTS[:1], [unseeded, other_seeded, greedy, seeded])
    batch_b = _gen(tiny_llm, [PROMPTS[0], PROMPTS[2], PROMPTS[0], PROMPTS[0]], [seeded, unseeded, other_seeded, seeded])
    assert batch_a[3] == alone
    assert batch_b[0] == alone and batch_b[3] == alone
    assert_idle(tiny_llm)


def test_different_seeds_give_different_outputs(tiny_llm):
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=6) for s in (1, 2, 3)]
    outs = _gen(tiny_llm, [PROMPTS[0]] * 3, params)
    assert outs[0] != outs[1] and outs[1] != outs[2] and outs[0] != outs[2]


# ---- engine level: stop conditions and outputs -------------------------------------------------


@pytest.fixture(scope="module")
def greedy_reference(tiny_llm):
    """Greedy outputs of PROMPTS, 24 tokens each, as (token_ids, text)."""
    outs = tiny_llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False)
    return [(o.outputs[0].token_ids, o.outputs[0].text) for o in outs]


def test_request_output_fields(tiny_llm, tokenizer, assert_idle):
    params = SamplingParams(temperature=0.0, max_tokens=6, logprobs=2)
    outs = tiny_llm.generate(PROMPTS, params, use_tqdm=False)
    assert [o.prompt for o in outs] == PROMPTS  # input order
    assert len({o.request_id for o in outs}) == len(PROMPTS)
    for prompt, out in zip(PROMPTS, outs):
        assert out.finished
        assert out.prompt_token_ids == tokenizer.encode(prompt)
        assert len(out.outputs) == 1
        comp = out.outputs[0]
        assert comp.index == 0
        assert len(comp.token_ids) == 6 and comp.finish_reason == "length" and comp.stop_reason is None
        assert comp.text == tokenizer.decode(comp.token_ids, skip_special_tokens=True)
        assert len(comp.logprobs) == 6
        for token, lp in zip(comp.token_ids, comp.logprobs):
            assert token in lp and len(lp) == 2  # greedy: the sampled token is the best one
            assert lp[token] == max(lp.values()) and lp[token] <= 0.0
        m = out.metrics
        assert m.time_to_first_token is not None and m.time_to_first_token > 0
        assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finished_time
        assert m.e2e_latency >= m.time_to_first_token
    assert_idle(tiny_llm)


def test_outputs_in_input_order_with_different_lengths(tiny_llm):
    lengths = [7, 1, 4, 2]
    params = [SamplingParams(temperature=0.0, max_tokens=n) for n in lengths]
    outs = tiny_llm.generate(PROMPTS, params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == lengths
    assert [o.prompt for o in outs] == PROMPTS
    tokens = tiny_llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=2), use_tqdm=False)
    assert tokens[0].prompt is None and tokens[0].prompt_token_ids == [5, 6, 7]
    assert tokens[0].outputs[0].logprobs is None


def test_max_tokens_and_greedy_prefix_consistency(tiny_llm, greedy_reference):
    for n in (1, 6):
        outs = tiny_llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=n), use_tqdm=False)
        for (ref_ids, _), out in zip(greedy_reference, outs):
            assert out.outputs[0].token_ids == ref_ids[:n]
            assert out.outputs[0].finish_reason == "length"


def test_stop_token_ids(tiny_llm, greedy_reference, assert_idle):
    ref_ids, _ = greedy_reference[0]
    # the first position whose token did not occur before it
    pos = next(i for i in range(2, len(ref_ids)) if ref_ids[i] not in ref_ids[:i])
    stop_id = ref_ids[pos]
    out = tiny_llm.generate(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=24, stop_token_ids=[stop_id]),
                            use_tqdm=False)[0].outputs[0]
    assert out.token_ids == ref_ids[: pos + 1]  # the stop token is kept in token_ids
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    # ...but its text is not in the output text
    before = tiny_llm.generate(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=pos), use_tqdm=False)[0]
    assert out.text == before.outputs[0].text
    assert_idle(tiny_llm)


def test_min_tokens_defers_stop_token_ids(tiny_llm, greedy_reference):
    ref_ids, _ = greedy_reference[1]
    first = ref_ids[0]
    params = SamplingParams(temperature=0.0, max_tokens=10, min_tokens=4, stop_token_ids=[first])
    out = tiny_llm.generate(PROMPTS[1], params, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) >= 4
    assert first not in out.token_ids[:4]
    assert out.token_ids[0] != first  # the mask changed the very first choice
    if out.finish_reason == "stop":
        assert out.token_ids[-1] == first and out.stop_reason == first
    else:
        assert len(out.token_ids) == 10


@pytest.fixture(scope="module")
def eos_llm(tiny_model, greedy_reference, tmp_path_factory):
    """The tiny model with the first greedy token of PROMPTS[0] declared an EOS token (in
    generation_config.json), so that EOS handling can be tested on a random model."""
    import json
    import shutil

    from martlet.llm import LLM

    path = tmp_path_factory.mktemp("eos_model") / "model"
    shutil.copytree(tiny_model, path)
    eos = greedy_reference[0][0][0]
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, eos]}))
    return LLM(path, device="cpu", dtype="float32", quiet=True), eos


def test_eos_stops_and_ignore_eos_and_min_tokens(eos_llm, greedy_reference, assert_idle):
    llm, eos = eos_llm
    ref_ids, _ = greedy_reference[0]
    assert eos in llm.engine.eos_token_ids
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == [eos] and out.finish_reason == "stop" and out.stop_reason is None
    assert out.text == ""
    ignored = llm.generate(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
                           use_tqdm=False)[0].outputs[0]
    assert ignored.token_ids == ref_ids[:8] and ignored.finish_reason == "length"
    min3 = llm.generate(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=8, min_tokens=3),
                        use_tqdm=False)[0].outputs[0]
    assert len(min3.token_ids) >= 3 and eos not in min3.token_ids[:3]
    assert min3.finish_reason in ("stop", "length")
    assert_idle(llm)


def test_finish_reasons_are_stop_or_length(tiny_llm):
    params = [
        SamplingParams(temperature=1.0, seed=i, max_tokens=6, stop=["e", "a"], stop_token_ids=[13, 30])
        for i in range(6)
    ]
    outs = tiny_llm.generate(PROMPTS + PROMPTS[:2], params, use_tqdm=False)
    for out in outs:
        comp = out.outputs[0]
        assert comp.finish_reason in ("stop", "length")
        if comp.finish_reason == "length":
            assert len(comp.token_ids) == 6 and comp.stop_reason is None
        else:
            assert comp.stop_reason in ("e", "a", 13, 30)
