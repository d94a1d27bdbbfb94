"""SamplingParams: every bad field is a ValueError naming the field and its allowed range, at
construction; every edge value that is allowed is accepted."""

from __future__ import annotations

import math

import pytest

from martlet.sampling_params import SamplingParams

# (field values, field name, a fragment of the allowed-range text the message must carry)
INVALID = [
    ({"temperature": -0.01}, "temperature", ">= 0"),
    ({"temperature": -1}, "temperature", ">= 0"),
    ({"temperature": math.nan}, "temperature", ">= 0"),
    ({"top_p": 0.0}, "top_p", "(0, 1]"),
    ({"top_p": -0.5}, "top_p", "(0, 1]"),
    ({"top_p": 1.0001}, "top_p", "(0, 1]"),
    ({"top_p": math.nan}, "top_p", "(0, 1]"),
    ({"top_k": 0}, "top_k", ">= 1"),
    ({"top_k": -2}, "top_k", "-1"),
    ({"top_k": -100}, "top_k", "-1"),
    ({"max_tokens": 0}, "max_tokens", ">= 1"),
    ({"max_tokens": -5}, "max_tokens", ">= 1"),
    ({"min_p": -0.1}, "min_p", "[0, 1]"),
    ({"min_p": 1.5}, "min_p", "[0, 1]"),
    ({"min_tokens": -1}, "min_tokens", ">= 0"),
    ({"min_tokens": 5, "max_tokens": 4}, "min_tokens", "max_tokens"),
    ({"logprobs": -1}, "logprobs", "in [0, 20]"),
    ({"logprobs": 21}, "logprobs", "in [0, 20]"),
    ({"n": 0}, "n", "[1, 128]"),
    ({"n": 129}, "n", "[1, 128]"),
    ({"logit_bias": {5: 100.5}}, "logit_bias", "[-100, 100]"),
    ({"logit_bias": {-1: 1}}, "logit_bias", "non-negative token ids"),
    ({"logit_bias": {"5": 1}}, "logit_bias", "non-negative token ids"),
    ({"logit_bias": [5]}, "logit_bias", "dict"),
    ({"prompt_logprobs": 21}, "prompt_logprobs", "in [0, 20]"),
    ({"repetition_penalty": 0.0}, "repetition_penalty", "> 0"),
    ({"repetition_penalty": -1.0}, "repetition_penalty", "> 0"),
    ({"presence_penalty": 2.5}, "presence_penalty", "[-2, 2]"),
    ({"presence_penalty": -2.1}, "presence_penalty", "[-2, 2]"),
    ({"frequency_penalty": 3.0}, "frequency_penalty", "[-2, 2]"),
    ({"frequency_penalty": -3.0}, "frequency_penalty", "[-2, 2]"),
    ({"stop": ""}, "stop", "non-empty string"),
    ({"stop": ["ok", ""]}, "stop", "non-empty string"),
    ({"stop": ["ok", 3]}, "stop", "non-empty string"),
    ({"stop": [None]}, "stop", "non-empty string"),
    ({"stop_token_ids": [-1]}, "stop_token_ids", "non-negative"),
    ({"stop_token_ids": [1, "2"]}, "stop_token_ids", "non-negative"),
    ({"stop_token_ids": [1.5]}, "stop_token_ids", "non-negative"),
    ({"seed": 1.5}, "seed", "integer"),
    ({"seed": "7"}, "seed", "integer"),
]


@pytest.mark.parametrize(("kwargs", "name", "rule"), INVALID, ids=[f"{k}" for k, _, _ in INVALID])
def test_invalid_value_is_rejected_with_field_and_range(kwargs, name, rule):
    with pytest.raises(ValueError) as info:
        SamplingParams(**kwargs)
    message = str(info.value)
    assert f"SamplingParams.{name} " in message, message
    assert rule in message, message


# Values of the wrong type altogether: still a ValueError that names the field (the class promises
# "every field is checked at construction: a bad value raises a ValueError naming the field").
WRONG_TYPE = [
    ({"stop_token_ids": 5}, "stop_token_ids"),
    ({"stop": 5}, "stop"),
    ({"temperature": None}, "temperature"),
    ({"top_p": "0.5"}, "top_p"),
    ({"max_tokens": "16"}, "max_tokens"),
]


@pytest.mark.parametrize(("kwargs", "name"), WRONG_TYPE, ids=[f"{k}" for k, _ in WRONG_TYPE])
def test_wrong_type_is_a_value_error_naming_the_field(kwargs, name):
    with pytest.raises(ValueError, match=f"SamplingParams.{name} "):
        SamplingParams(**kwargs)


VALID_EDGES = [
    {"temperature": 0.0},
    {"temperature": 1e-6},
    {"temperature": 100.0},
    {"top_p": 1.0},
    {"top_p": 1e-9},
    {"top_k": -1},
    {"top_k": 1},
    {"top_k": 10**9},
    {"min_p": 0.0},
    {"min_p": 1.0},
    {"max_tokens": 1},
    {"max_tokens": None},
    {"max_tokens": None, "min_tokens": 1000},
    {"min_tokens": 0},
    {"min_tokens": 16, "max_tokens": 16},
    {"logprobs": 0},
    {"logprobs": 20},
    {"logprobs": None},
    {"n": 1},
    {"repetition_penalty": 1e-3},
    {"repetition_penalty": 10.0},
    {"presence_penalty": -2.0, "frequency_penalty": 2.0},
    {"presence_penalty": 2.0, "frequency_penalty": -2.0},
    {"stop": "x"},
    {"stop": ["a", "bc"]},
    {"stop": []},
    {"stop": None},
    {"stop_token_ids": [0, 5]},
    {"stop_token_ids": []},
    {"seed": 0},
    {"seed": 2**31},
    {"ignore_eos": True, "skip_special_tokens": False, "detokenize": False},
]


@pytest.mark.parametrize("kwargs", VALID_EDGES, ids=[f"{k}" for k in VALID_EDGES])
def test_valid_edge_values_are_accepted(kwargs):
    params = SamplingParams(**kwargs)
    for key, value in kwargs.items():
        if key not in ("stop", "stop_token_ids"):
            assert getattr(params, key) == value


def test_defaults():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, -1, 0.0)
    assert (p.max_tokens, p.min_tokens, p.logprobs, p.seed) == (16, 0, None, None)
    assert p.stop_strings == [] and p.stop_token_ids == []
    assert not p.greedy and not p.ignore_eos


def test_stop_is_normalized_to_a_list():
    assert SamplingParams(stop="END").stop_strings == ["END"]
    assert SamplingParams(stop=("a", "b")).stop_strings == ["a", "b"]
    assert SamplingParams(stop=None).stop_strings == []
    assert SamplingParams(stop_token_ids=(3, 4)).stop_token_ids == [3, 4]
    assert SamplingParams(stop_token_ids=None).stop_token_ids == []


def test_greedy_means_temperature_zero():
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(temperature=0.0, top_k=5, top_p=0.5).greedy
    assert not SamplingParams(temperature=1e-6).greedy


def test_stop_strings_need_detokenize():
    with pytest.raises(ValueError, match="stop"):
        SamplingParams(stop=["END"], detokenize=False)
