"""Medusa heads and EAGLE, speculating for the tiny random model: lossless whatever they guess; trees
of proposals (Medusa's, and an oracle's whose right path is or is not the first branch).

Their checkpoints are written here in the formats Martlet reads (`martlet/models/speculators.py`).
"Echo" weights guess the target's own next token again (a Medusa head with zero residual blocks and
the target's LM head; an EAGLE layer that passes the target's hidden state through), which the
tiny model's runs of one repeated token accept; random weights are mostly rejected.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from martlet import LLM, SamplingParams
from martlet.config import SpeculativeConfig
from martlet.engine.sequence import PLACEHOLDER
from martlet.engine.speculative import Proposer, accepted_path, tree_rows
from martlet.testing import make_tiny_model

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
RUN = [1465] * 40  # the tiny model answers with a run of one token


def target_weights(model: Path) -> dict[str, torch.Tensor]:
    return {name: t for file in model.glob("*.safetensors") for name, t in load_file(file).items()}


def write_medusa(path: Path, model: Path, echo: bool, num_heads: int = 3, num_layers: int = 1,
                 suffix: str = "safetensors") -> Path:
    lm_head = target_weights(model)["lm_head.weight"]
    vocab, hidden = lm_head.shape
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * 0.1

    weights = {}
    for i in range(num_heads):
        for j in range(num_layers):
            weights[f"{i}.{j}.linear.weight"] = torch.zeros(hidden, hidden) if echo else rand(hidden, hidden)
            weights[f"{i}.{j}.linear.bias"] = torch.zeros(hidden) if echo else rand(hidden)
        weights[f"{i}.{num_layers}.weight"] = lm_head.clone() if echo else rand(vocab, hidden)
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"medusa_num_heads": num_heads, "medusa_num_layers": num_layers}))
    if suffix == "pt":
        torch.save(weights, path / "medusa_lm_head.pt")
    else:
        save_file(weights, path / "medusa_lm_head.safetensors")
    return path


def write_eagle(path: Path, model: Path, echo: bool) -> Path:
    """One decoder layer shaped like the target's, an fc with bias, and a copy of the embedding
    (which Martlet ignores: the target's serves)."""
    target = target_weights(model)
    hidden = target["model.embed_tokens.weight"].shape[1]
    gen = torch.Generator().manual_seed(1)
    weights = {name.removeprefix("model."): torch.ones(t.shape) if "norm" in name else
               torch.randn(t.shape, generator=gen) * 0.1
               for name, t in target.items() if name.startswith("model.layers.0.") and "input_layernorm" not in name}
    weights["fc.weight"] = torch.randn(hidden, 2 * hidden, generator=gen) * 0.1
    weights["fc.bias"] = torch.zeros(hidden)
    if echo:  # the target's hidden state straight through: attention and MLP add nothing
        weights["fc.weight"] = torch.cat([torch.zeros(hidden, hidden), torch.eye(hidden)], dim=1)
        weights["layers.0.self_attn.o_proj.weight"] = torch.zeros(hidden, hidden)
        weights["layers.0.mlp.down_proj.weight"].zero_()
    weights["embed_tokens.weight"] = target["model.embed_tokens.weight"]
    path.mkdir(parents=True)
    config = json.loads((model / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1, "architectures": None}))
    save_file(weights, path / "model.safetensors")
    return path


@pytest.fixture(scope="module")
def heads(tiny_model, tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("heads")
    return {
        "medusa-echo": {"method": "medusa", "model": str(write_medusa(root / "me", tiny_model, echo=True))},
        "medusa-random": {"method": "medusa", "model": str(write_medusa(root / "mr", tiny_model, echo=False,
                                                                          num_layers=2, suffix="pt"))},
        "eagle-echo": {"method": "eagle", "model": str(write_eagle(root / "ee", tiny_model, echo=True))},
        "eagle-random": {"method": "eagle", "model": str(write_eagle(root / "er", tiny_model, echo=False))},
    }


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("draft") / "model", "llama", seed=1)


@pytest.fixture(scope="module")
def requests_and_plain(tiny_model):
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 49000) for _ in range(n)] for n in (5, 17, 33)] + [RUN]
    requests = [{"prompt_token_ids": p} for p in prompts]
    plain = LLM(tiny_model, device="cpu", dtype="float32", quiet=True).generate(requests, GREEDY, use_tqdm=False)
    return requests, [o.outputs[0].token_ids for o in plain]


@pytest.mark.parametrize("name", ["medusa-echo", "medusa-random", "eagle-echo", "eagle-random"])
def test_greedy_tokens_are_unchanged(name, heads, tiny_model, requests_and_plain, assert_idle):
    requests, expected = requests_and_plain
    llm = LLM(tiny_model, device="cpu", dtype="float32", quiet=True,
              speculative_config={**heads[name], "num_speculative_tokens": 3})
    outs = llm.generate(requests, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert all(o.metrics.num_draft_tokens > 0 for o in outs)
    if name.endswith("echo"):  # the run accepts every guess
        assert outs[-1].metrics.acceptance_rate == 1.0
    assert_idle(llm)


@pytest.mark.parametrize("name", ["medusa-echo", "eagle-random"])
def test_greedy_tokens_are_unchanged_under_preemption(name, heads, tiny_model, requests_and_plain):
    """4 blocks of 16 cannot hold the batch: sequences are preempted and recomputed."""
    requests, expected = requests_and_plain
    llm = LLM(tiny_model, device="cpu", dtype="float32", quiet=True, num_kv_blocks=4,
              speculative_config={**heads[name], "num_speculative_tokens": 3})
    outs = llm.generate(requests, GREEDY, use_tqdm=False)
    assert sum(o.metrics.num_preemptions for o in outs) > 0
    assert [o.outputs[0].token_ids for o in outs] == expected


def test_eagle_reads_the_targets_hidden_states_at_their_slots(heads, tiny_model):
    """The features pool holds, at each computed position's cache slot, Hugging Face's last hidden
    state (after the final norm) at that position."""
    llm = LLM(tiny_model, device="cpu", dtype="float32", quiet=True, block_size=8,
              speculative_config={**heads["eagle-random"], "num_speculative_tokens": 3})
    engine = llm.engine
    engine.add_request(list(range(100, 119)), SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    for _ in range(4):
        engine.step()
    seq = engine.scheduler.running[0]
    known = seq.token_ids[: seq.num_computed_tokens]
    known = known[: known.index(PLACEHOLDER)] if PLACEHOLDER in known else known  # the step in flight's input
    assert len(known) > 19
    positions = torch.arange(len(known))
    slots = torch.tensor(seq.block_table)[positions // 8] * 8 + positions % 8
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = hf.model(torch.tensor([known])).last_hidden_state[0]
    torch.testing.assert_close(engine.proposer.features[slots], expected, atol=1e-4, rtol=1e-4)
    assert seq.metrics.num_spec_steps > 0
    while engine.has_unfinished_requests():
        engine.step()


def test_bad_head_checkpoints_say_what_is_read(heads, tiny_model, tmp_path):
    def load(config: dict):
        return LLM(tiny_model, device="cpu", quiet=True, speculative_config={**config, "num_speculative_tokens": 3})

    with pytest.raises(ValueError, match="has only 3 Medusa heads"):
        LLM(tiny_model, device="cpu", quiet=True,
            speculative_config={**heads["medusa-echo"], "num_speculative_tokens": 4})
    vllm = tmp_path / "vllm"
    vllm.mkdir()
    (vllm / "config.json").write_text(json.dumps({"architectures": ["MedusaModel"], "num_heads": 3}))
    with pytest.raises(ValueError, match="vLLM's MedusaModel format is not read"):
        load({"method": "medusa", "model": str(vllm)})
    with pytest.raises(ValueError, match="not a Medusa checkpoint"):
        load({"method": "medusa", "model": heads["eagle-echo"]["model"]})
    wide = tmp_path / "wide"
    wide.mkdir()
    config = json.loads((Path(heads["eagle-echo"]["model"]) / "config.json").read_text())
    (wide / "config.json").write_text(json.dumps({**config, "hidden_size": 128}))
    with pytest.raises(ValueError, match="hidden size 128"):
        load({"method": "eagle", "model": str(wide)})


@pytest.mark.gpu
def test_cuda_graphs_and_triton_kernels_give_the_same_tokens(heads, tiny_model, other_model_dir, requests_and_plain):
    """On a GPU: decode graphs hand Medusa and EAGLE the hidden states too, verification steps (trees
    too) run the piecewise graphs and the Triton kernels, and so do a draft model's steps."""
    requests, _ = requests_and_plain

    def run(config: dict | None) -> list[list[int]]:
        # A pool of its own size: the GPU may still hold the engine before this one (not yet collected).
        llm = LLM(tiny_model, device="cuda", dtype="float32", max_num_seqs=8, num_kv_blocks=256, quiet=True,
                  speculative_config=config)
        return [o.outputs[0].token_ids for o in llm.generate(requests, GREEDY, use_tqdm=False)]

    plain = run(None)
    tree = {**heads["medusa-echo"], "speculative_token_tree": [[0], [1], [0, 0], [1, 0], [0, 1]]}
    for config in (heads["medusa-echo"], tree, heads["eagle-echo"], heads["eagle-random"], {"model": str(tiny_model)},
                   {"model": str(other_model_dir)}):
        assert run({**config, "num_speculative_tokens": 3}) == plain, config


# ---- trees of proposals (greedy) ---------------------------------------------------------------


def test_tree_rows_place_each_node_at_its_depth():
    # root (row 0) -> 1, 2; 1 -> 3; 3 -> 4
    offsets, bits = tree_rows([0, 0, 1, 3], num_own=1)
    assert offsets == [0, 0, 1, 1, 1]  # rows 0..4 at depths 0, 1, 1, 2, 3
    assert bits == [0b1, 0b11, 0b101, 0b1011, 0b11011]
    offsets, bits = tree_rows([0], num_own=3)  # two uncomputed tokens before the root
    assert offsets == [0, 0, 0, 0] and bits == [0b1, 0b11, 0b111, 0b1111]


def test_the_accepted_path_follows_the_targets_tokens():
    drafts, parents = [5, 7, 6, 8], [0, 0, 1, 3]  # 5 and 7 after the root, 6 after 5, 8 after 6
    assert accepted_path(drafts, parents, [5, 6, 0, 8, 9]) == ([5, 6, 8, 9], 4, 1)  # 5 in place at row 1, 6 at row 3
    assert accepted_path(drafts, parents, [7, 0, 1, 0, 0]) == ([7, 1], 2, 0)
    assert accepted_path(drafts, parents, [4, 0, 0, 0, 0]) == ([4], 0, 0)
    assert accepted_path([5, 6, 7], [0, 1, 0], [5, 6, 3, 0]) == ([5, 6, 3], 2, 2)  # rows 1, 2 in place


class OracleTreeProposer(Proposer):
    """Knows each prompt's greedy continuation: proposes a tree where the right path is the first
    branch (`first`), or the second, beside wrong siblings."""

    def __init__(self, config, max_model_len: int, continuations: dict[tuple[int, ...], list[int]], first: bool):
        super().__init__(config, max_model_len)
        self.continuations, self.first = continuations, first

    def _guess(self, seq, k: int) -> list[int]:
        done = len(seq.output_token_ids)
        right = self.continuations[tuple(seq.token_ids[: seq.num_prompt_tokens])][done : done + k]
        wrong = [(t + 1) % 4096 for t in right]
        tokens, parents, parent = [], [], 0
        for good, bad in zip(right, wrong):
            pair = [good, bad] if self.first else [bad, good]
            tokens += pair
            parents += [parent, parent]
            parent = len(tokens) - (1 if self.first else 0)  # the row of the right one
        seq.spec_parents = parents
        return tokens


@pytest.mark.parametrize("first", [True, False])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_tree_with_the_right_path_is_accepted_and_changes_nothing(first, backend, tiny_model, requests_and_plain):
    """The right path on the first branch is accepted in place; on the second, its tokens are computed
    again next step. Tokens as without speculation, either way, on both attention backends."""
    requests, expected = requests_and_plain
    requests, expected = (requests, expected) if backend == "torch" else (requests[1:3], expected[1:3])
    llm = LLM(tiny_model, device="cpu", dtype="float32", quiet=True, attention_backend=backend,
              speculative_config={"method": "ngram", "num_speculative_tokens": 3})
    continuations = {tuple(r["prompt_token_ids"]): e for r, e in zip(requests, expected)}
    llm.engine.proposer = OracleTreeProposer(llm.engine.proposer.config, llm.engine.config.max_model_len,
                                             continuations, first)
    outs = llm.generate(requests, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert all(o.metrics.num_accepted_tokens >= 3 for o in outs)  # a whole path at least once


def test_medusa_trees_change_nothing(heads, tiny_model, requests_and_plain):
    requests, expected = requests_and_plain
    tree = [[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0], [2, 1], [1, 0, 1]]
    llm = LLM(tiny_model, device="cpu", dtype="float32", quiet=True,
              speculative_config={**heads["medusa-echo"], "num_speculative_tokens": 3, "speculative_token_tree": tree})
    outs = llm.generate(requests, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert outs[-1].metrics.num_draft_tokens > 3 * outs[-1].metrics.num_spec_steps  # trees, not chains
    assert outs[-1].metrics.num_accepted_tokens > 0


@pytest.mark.parametrize("tree, message", [
    ([[0], [0, 1, 2, 0]], "at most 3 deep"),
    ([[1, 0]], "whose parent is a node"),
    ([[0], [0]], "a new path"),
    ([[-1]], "integers >= 0"),
])
def test_a_bad_tree_says_why(tree, message):
    with pytest.raises(ValueError, match=message):
        SpeculativeConfig.from_dict({"method": "medusa", "model": "heads", "num_speculative_tokens": 3,
                                     "speculative_token_tree": tree})
    with pytest.raises(ValueError, match="unknown keys"):
        SpeculativeConfig.from_dict({"model": "draft", "num_speculative_tokens": 3, "speculative_token_tree": [[0]]})
