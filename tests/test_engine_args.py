"""EngineArgs is where every engine option lives: `LLM(...)` and every command take the same ones."""

import pytest

from martlet import LLM
from martlet.cli import build_parser
from martlet.config import EngineArgs

COMMANDS = [["generate", "--prompt", "x"], ["chat"], ["serve"], ["bench", "latency"], ["bench", "throughput"]]


@pytest.mark.parametrize("argv", COMMANDS)
def test_every_command_takes_every_engine_option_with_its_default(argv):
    from_flags = EngineArgs.from_cli_args(build_parser().parse_args(argv))
    assert from_flags == EngineArgs(model=from_flags.model)


def test_flags_reach_the_engine_arguments():
    argv = ["generate", "--prompt", "x", "--model", "m", "--max-num-seqs", "3", "-q", "fp8", "--enforce-eager",
            "--kv-cache-dtype", "int8", "--gpu-memory-utilization", "0.5"]
    args = EngineArgs.from_cli_args(build_parser().parse_args(argv))
    assert args == EngineArgs(model="m", max_num_seqs=3, quantization="fp8", enforce_eager=True,
                              kv_cache_dtype="int8", gpu_memory_utilization=0.5)


def test_an_unknown_engine_argument_is_a_type_error(tiny_model):
    with pytest.raises(TypeError, match="kv_cache_dtyp"):
        LLM(tiny_model, kv_cache_dtyp="int8")


def test_a_speculative_model_with_tensor_parallelism_is_refused_before_any_rank_starts(tiny_model):
    with pytest.raises(ValueError, match="tensor parallelism"):
        LLM(tiny_model, tensor_parallel_size=2, speculative_config={"model": tiny_model, "num_speculative_tokens": 2})


@pytest.mark.parametrize("kv_cache_dtype, block_size, expected", [("auto", None, 16), ("int8", None, 128),
                                                                   ("fp8", None, 128), ("int8", 32, 32)])
def test_an_8bit_cache_takes_128_token_blocks_unless_told(tiny_model, kv_cache_dtype, block_size, expected):
    from martlet.engine.llm_engine import resolve_config

    args = EngineArgs(model=tiny_model, device="cpu", kv_cache_dtype=kv_cache_dtype, block_size=block_size)
    assert resolve_config(args)[0].block_size == expected
