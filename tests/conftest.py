"""Shared fixtures: one tiny random Llama with SmolLM2's real tokenizer, built once per session.

`tiny_model` is the path of a Hugging Face directory made by `martlet.testing.make_tiny_model`;
`tiny_llm` is that model loaded once on the CPU in float32. Tests that need a differently
configured engine (a small KV pool, other limits) build their own `LLM` from `tiny_model`.
Tests that use `tiny_llm` must leave it as they found it: no requests left, all blocks free.
"""

from __future__ import annotations

import pytest

from martlet.testing import load_test_tokenizer, make_tiny_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny_llama") / "model", "llama")


@pytest.fixture(scope="session")
def tiny_llm(tiny_model):
    from martlet.llm import LLM

    return LLM(tiny_model, device="cpu", dtype="float32", quiet=True)


@pytest.fixture(scope="session")
def tokenizer():
    return load_test_tokenizer()


@pytest.fixture(scope="session")
def assert_idle():
    """A checker: `assert_idle(llm)` fails unless nothing is queued or running and every KV block
    is back in the free pool."""
    return _assert_engine_idle


def _assert_engine_idle(llm) -> None:
    engine = llm.engine
    assert not engine.has_unfinished_requests()
    assert not engine.requests and not engine.detokenizers
    assert not engine.scheduler.waiting and not engine.scheduler.running
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert all(block.ref_count == 0 for block in bm.blocks)
