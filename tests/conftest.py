"""Shared fixtures: one tiny random Llama with SmolLM2's real tokenizer, built once per session.

`tiny_model` is the path of a Hugging Face directory made by `martlet.testing.make_tiny_model`;
`tiny_llm` is that model loaded once on the CPU in float32. Tests that need a differently
configured engine (a small KV pool, other limits) build their own `LLM` from `tiny_model`.
Tests that use `tiny_llm` must leave it as they found it: no requests left, all blocks free.

Without a GPU, Triton kernels run in Triton's interpreter: TRITON_INTERPRET must be set before
any kernel is decorated, so it is set here, before pytest imports any test module, and tests
marked `gpu` are skipped.
"""

from __future__ import annotations

import os

import pytest
import torch

from martlet.testing import load_test_tokenizer, make_tiny_model  # imports no kernels

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


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
def smollm2_reference():
    """The unquantized default model's next tokens and answers on real text (`quality.Reference`)."""
    from quality import Reference

    return Reference()


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
