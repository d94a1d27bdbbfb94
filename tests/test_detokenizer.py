"""Incremental detokenizing with SmolLM2's real (byte-level BPE) tokenizer, stop strings, the
stable text a stream may show, and stop strings at the engine level on the tiny model."""

from __future__ import annotations

import random

import pytest

from martlet.engine.detokenizer import IncrementalDetokenizer
from martlet.sampling_params import SamplingParams

TEXTS = [
    "Café crème brûlée — naïve façade, Ærøskøbing",
    "日本語のテキストです。東京タワーに行きました",
    "Emoji 😀👍🏽🎉 family 👨‍👩‍👧‍👦 flags 🇫🇷 done",
    "mixed: αβγ ≠ ∑ → ∞, Привет мир, שלום, مرحبا  spaces   here .",
    "Ünïcödé\nnew line\ttab\r\n  indented {code: [1, 2]} 'quotes' \"double\"",
]
PROMPT = "Prompt: "  # ends on a character boundary, like any prompt made from text


def stream(tokenizer, prompt_ids, ids, stop=(), skip_special_tokens=True, chunks=None):
    """Feed ids as generation would (one at a time, or in `chunks` sizes); record each step."""
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, list(stop), skip_special_tokens)
    states = []
    i = 0
    while i < len(ids) and not detok.finished:
        n = chunks.pop(0) if chunks else 1
        hit = detok.add_tokens(ids[i : i + n])
        i += n
        states.append((detok.text, detok.stable_text, hit, detok.finished))
    detok.flush()
    return detok, states


# ---- concatenation equals a one-shot decode ------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_text_equals_full_decode(tokenizer, text):
    ids = tokenizer.encode(text)
    detok, states = stream(tokenizer, tokenizer.encode(PROMPT), ids)
    assert detok.text == tokenizer.decode(ids, skip_special_tokens=True) == text
    for partial, stable, hit, finished in states:
        assert text.startswith(partial)  # the text only ever grows
        assert not partial.endswith("\ufffd")  # half a character is held back, never shown
        assert stable == partial and hit is None and not finished  # no stop strings: all is stable


@pytest.mark.parametrize("text", TEXTS)
def test_chunked_feeding_gives_the_same_text(tokenizer, text):
    ids = tokenizer.encode(text)
    rng = random.Random(len(text))
    chunks = []
    while sum(chunks) < len(ids):
        chunks.append(rng.randint(1, 4))
    detok, _ = stream(tokenizer, tokenizer.encode(PROMPT), ids, chunks=chunks)
    assert detok.text == text


def test_multibyte_characters_split_across_tokens_are_held_back(tokenizer):
    ids = tokenizer.encode("a😀b")
    assert len(ids) == 5  # 'a', three byte tokens of the emoji, 'b'
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode(PROMPT), [], True)
    seen = []
    for t in ids:
        detok.add_tokens([t])
        seen.append(detok.text)
    assert seen == ["a", "a", "a", "a😀", "a😀b"]


def test_flush_emits_an_incomplete_trailing_character(tokenizer):
    ids = tokenizer.encode("x😀")[:-1]  # 'x' and two of the emoji's three bytes
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode(PROMPT), [], True)
    for t in ids:
        detok.add_tokens([t])
    assert detok.text == "x"
    detok.flush()
    assert detok.finished and detok.text == tokenizer.decode(ids) and detok.text.startswith("x\ufffd")


@pytest.mark.parametrize("skip_special_tokens", [True, False])
@pytest.mark.parametrize("seed", range(3))
def test_random_token_sequences_equal_full_decode(tokenizer, seed, skip_special_tokens):
    """Arbitrary ids (lone UTF-8 bytes that never complete, special tokens, anything): with a prompt
    that ends on a character boundary the streamed text equals the one-shot decode exactly,
    invalid bytes included (each shows as U+FFFD in both)."""
    rng = random.Random(seed)
    vocab = len(tokenizer)
    special = list(tokenizer.all_special_ids)
    byte_tokens = list(range(17, 300))  # single-byte and short tokens, many of them partial UTF-8
    for _ in range(40):
        ids = [
            rng.choice(special) if r < 0.1 else rng.choice(byte_tokens) if r < 0.5 else rng.randrange(vocab)
            for r in (rng.random() for _ in range(rng.randint(1, 25)))
        ]
        prompt = tokenizer.encode(rng.choice(["Hi", "", "日本", "x😀"]) or "a")
        detok, states = stream(tokenizer, prompt, ids, skip_special_tokens=skip_special_tokens)
        assert detok.text == tokenizer.decode(ids, skip_special_tokens=skip_special_tokens), ids
        for partial, *_ in states:
            assert detok.text.startswith(partial)


def test_prompt_ending_inside_a_character(tokenizer):
    """The one legitimate difference: when the prompt ends in the middle of a character, the
    output's first bytes complete the prompt's character. Decoding the output alone shows those
    bytes as U+FFFD; the stream instead gives what the output adds to the prompt's text, i.e.
    decode(prompt + output) minus decode(prompt) (the completed character belongs to neither)."""
    ids = tokenizer.encode("😀 and 🎉 done")
    for cut in (1, 2):  # inside the first emoji
        prompt, out = ids[:cut], ids[cut:]
        detok, _ = stream(tokenizer, prompt, out)
        assert tokenizer.decode(out).startswith("\ufffd")
        assert detok.text == tokenizer.decode(prompt + out)[len(tokenizer.decode(prompt)) :] == " and 🎉 done"


# ---- stop strings --------------------------------------------------------------------------------

SENTENCE = "Hello world, this is a test of stop strings. Done."


def _first_token_completing(tokenizer, ids, stop) -> int:
    for n in range(1, len(ids) + 1):
        if stop in tokenizer.decode(ids[:n]):
            return n
    raise AssertionError("stop string never appears")


@pytest.mark.parametrize("stop", ["world, this", "o w", "Hello", "s. D", ".", "test of stop strings. Done."])
def test_stop_string_cuts_the_text_where_it_starts(tokenizer, stop):
    ids = tokenizer.encode(SENTENCE)
    n = _first_token_completing(tokenizer, ids, stop)
    detok, states = stream(tokenizer, tokenizer.encode(PROMPT), ids, stop=[stop])
    assert len(states) == n  # it stopped on the token that completed the stop string
    assert [hit for *_, hit, _ in states] == [None] * (n - 1) + [stop]
    assert detok.finished and detok.text == SENTENCE[: SENTENCE.index(stop)]
    assert detok.stable_text == detok.text


def test_stop_string_spanning_tokens(tokenizer):
    ids = tokenizer.encode(SENTENCE)
    pieces = [tokenizer.decode(ids[:i]) for i in range(len(ids) + 1)]
    i = 4  # a stop string made of the end of token i-1 and the start of token i
    stop = pieces[i][-2:] + pieces[i + 1][len(pieces[i]) :][:2]
    assert len(stop) == 4 and stop in SENTENCE
    detok, states = stream(tokenizer, tokenizer.encode(PROMPT), ids, stop=[stop])
    assert len(states) == _first_token_completing(tokenizer, ids, stop)
    assert detok.text == SENTENCE[: SENTENCE.index(stop)]


def test_earliest_stop_string_wins(tokenizer):
    ids = tokenizer.encode(SENTENCE)
    prompt = tokenizer.encode(PROMPT)
    # one delta holding two matches: the earlier one cuts
    detok = IncrementalDetokenizer(tokenizer, prompt, ["test", "world", "is a"], True)
    assert detok.add_tokens(ids) == "world"
    assert detok.text == "Hello "
    # streamed: the one completed first stops generation and cuts at its start
    detok, _ = stream(tokenizer, prompt, ids, stop=["stop strings", "is a", "this"])
    assert detok.text == SENTENCE[: SENTENCE.index("this")]
    detok, _ = stream(tokenizer, prompt, ids, stop=["Done", "xyz"])
    assert detok.text == SENTENCE[: SENTENCE.index("Done")]
    detok, _ = stream(tokenizer, prompt, ids, stop=["not there", "nor this"])
    assert detok.text == SENTENCE


@pytest.mark.parametrize("seed", range(4))
def test_stable_text_never_shows_a_possible_stop_string_start(tokenizer, seed):
    """While unfinished, stable_text is a prefix of the final text and stops before any suffix of
    the text that is a proper prefix of a stop string; once finished it is the whole text."""
    rng = random.Random(seed)
    alphabet = ["ab", "a", "b", "c", " ", "ba", "abc", "ca", "é", "😀"]
    stops = [["abca"], ["bb", "cab"], ["a😀b", "cc"], ["abab", "b c", "aaa"]][seed]
    for _ in range(30):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30)))
        ids = tokenizer.encode(text)
        detok, states = stream(tokenizer, tokenizer.encode(PROMPT), ids, stop=stops)
        final = detok.text
        expect_cut = min((text.index(s) for s in stops if s in text), default=len(text))
        assert final == text[:expect_cut]
        for partial, stable, _, finished in states:
            assert final.startswith(stable)
            if finished:
                assert stable == partial == final
                continue
            for s in stops:
                for k in range(1, len(s)):
                    if partial.endswith(s[:k]):
                        assert len(stable) <= len(partial) - k, (partial, stable, s)
        assert detok.stable_text == final


def test_stable_text_holds_back_the_longest_stop_minus_one(tokenizer):
    ids = tokenizer.encode("abcdefghij")
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode(PROMPT), ["xyz", "q"], True)
    for t in ids:
        detok.add_tokens([t])
        assert detok.stable_text == detok.text[: max(0, len(detok.text) - 2)]
    detok.flush()
    assert detok.stable_text == "abcdefghij"


# ---- engine level ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(tiny_llm):
    """A greedy output of the tiny model, with the cumulative decodes of its tokens."""
    llm_tok = tiny_llm.get_tokenizer()
    prompt = "Hello, my name is"
    out = tiny_llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)[0]
    ids = out.outputs[0].token_ids
    pieces = [llm_tok.decode(ids[:n]) for n in range(len(ids) + 1)]
    assert out.outputs[0].text == pieces[-1]
    return prompt, ids, pieces


def _stop_across(pieces, i):
    """A 4-character stop string: the last 2 characters of token i-1's text and the first 2 of
    token i's."""
    before, mine = pieces[i][len(pieces[i - 1]) :], pieces[i + 1][len(pieces[i]) :]
    assert len(before) >= 2 and len(mine) >= 2 and "\ufffd" not in pieces[i + 1]
    return before[-2:] + mine[:2]


def _complete_at(pieces, stop):
    return next(n for n, p in enumerate(pieces) if stop in p)


@pytest.mark.parametrize("position", [2, 6])
def test_engine_stop_string_spanning_two_tokens(tiny_llm, reference, assert_idle, position):
    prompt, ids, pieces = reference
    stop = _stop_across(pieces, position)
    full = pieces[-1]
    out = tiny_llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=16, stop=stop),
                            use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert stop not in out.text
    assert out.text == full[: full.index(stop)]  # ends exactly where the stop string starts
    assert out.token_ids == ids[: _complete_at(pieces, stop)]
    assert_idle(tiny_llm)


def test_engine_multiple_stop_strings_earliest_wins(tiny_llm, reference):
    prompt, ids, pieces = reference
    early, late = _stop_across(pieces, 2), _stop_across(pieces, 6)
    full = pieces[-1]
    early_at = _complete_at(pieces, early)
    assert early_at < _complete_at(pieces, late)
    out = tiny_llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=16, stop=[late, early, "@@@"]),
                            use_tqdm=False)[0].outputs[0]
    assert out.stop_reason == early and out.text == full[: full.index(early)]
    assert out.token_ids == ids[:early_at]
    never = tiny_llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=16, stop=["@@@"]),
                              use_tqdm=False)[0].outputs[0]
    assert never.finish_reason == "length" and never.text == full and never.token_ids == ids


def test_engine_min_tokens_defers_stop_strings(tiny_llm, reference, assert_idle):
    prompt, ids, pieces = reference
    stop = _stop_across(pieces, 2)
    assert _complete_at(pieces, stop) < 8
    out = tiny_llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=16, min_tokens=8, stop=stop),
                            use_tqdm=False)[0].outputs[0]
    assert_idle(tiny_llm)
    assert len(out.token_ids) >= 8


def test_the_rust_decoder_serves_only_where_it_gives_the_same_text(tokenizer):
    import copy

    from martlet.engine.detokenizer import _fast_decode

    assert _fast_decode(tokenizer) == tokenizer.backend_tokenizer.decode
    cleaned = copy.copy(tokenizer)
    cleaned.clean_up_tokenization_spaces = True  # a clean-up transformers applies after the Rust decoder
    assert _fast_decode(cleaned) == cleaned.decode
