"""`martlet bench latency` and `martlet bench throughput` end to end on a tiny config-only model (CPU)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from martlet.bench.roofline import Ceilings, Roofline, StepCost
from martlet.cli import main
from martlet.models.loader import read_model_config
from martlet.testing import make_tiny_model


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory):
    """config.json alone, like the benchmark model directories: dummy weights, token-id prompts."""
    model = make_tiny_model(tmp_path_factory.mktemp("bench-model"), "llama", with_tokenizer=False)
    bare = tmp_path_factory.mktemp("bench-config")
    shutil.copy(model / "config.json", bare)
    return bare


def run_bench(args: list[str], tmp_path) -> dict:
    out = tmp_path / "result.json"
    with pytest.raises(SystemExit) as done:
        main(["bench", *args, "--load-format", "dummy", "--device", "cpu", "--dtype", "float32", "--quiet",
              "--json", str(out)])
    assert done.value.code == 0
    return json.loads(out.read_text())


def check_roofline(result: dict) -> None:
    assert result["seconds"] > 0 and 0 < result["roofline_seconds"]
    assert result["roofline_pct"] == pytest.approx(100 * result["roofline_seconds"] / result["seconds"])
    assert result["ceilings"]["copy_gb_s"] > 0 and result["ceilings"]["gemm_tflops"] > 0


def test_bench_latency(config_dir, tmp_path, capsys, monkeypatch):
    # A GPU machine has no default model installed: --config-dir must not look for it.
    monkeypatch.setattr("martlet.models.gguf.default_model_path", lambda: pytest.fail("looked up the default model"))
    result = run_bench(["latency", "--config-dir", str(config_dir), "--batch-size", "3", "--input-len", "40",
                        "--output-len", "6", "--num-iters", "2"], tmp_path)
    assert result["output_tokens"] == 18 and result["input_tokens"] == 120
    assert result["steps"] == 6  # one prefill step, then a decode step per further token
    assert len(result["iterations_s"]) == 2 and result["ttft_ms"] > 0 and result["ms_per_output_token"] > 0
    # Each iteration has prompts of its own: a repeated prompt would skip its prefill through the cache.
    assert result["prefix_cache_hit_tokens"] == 0
    check_roofline(result)
    table = capsys.readouterr().out
    assert "output throughput" in table and "tok/s" in table and "% achieved" in table


def test_bench_throughput_workload(config_dir, tmp_path):
    lengths = [(5, 3), (33, 1), (17, 9), (1, 4)]
    workload = tmp_path / "workload.jsonl"
    workload.write_text("".join(json.dumps({"input_len": i, "output_len": o}) + "\n" for i, o in lengths))
    result = run_bench(["throughput", "--config-dir", str(config_dir), "--workload", str(workload),
                        "--num-prompts", "3"], tmp_path)
    assert result["requests"] == 3 and result["output_tokens"] == 3 + 1 + 9  # each request exactly its output_len
    assert result["input_tokens"] == 5 + 33 + 17
    check_roofline(result)


def test_bench_throughput_fixed_lengths(config_dir, tmp_path):
    result = run_bench(["throughput", "--config-dir", str(config_dir), "--num-prompts", "5", "--input-len", "7",
                        "--output-len", "4"], tmp_path)
    assert result["requests"] == 5 and result["output_tokens"] == 20 and result["requests_per_s"] > 0


def test_bench_throughput_needs_lengths(config_dir, tmp_path):
    with pytest.raises(SystemExit) as done:
        main(["bench", "throughput", "--config-dir", str(config_dir), "--load-format", "dummy", "--device", "cpu",
              "--num-prompts", "5"])
    assert "--workload" in str(done.value.code)


def test_roofline_of_one_rank_is_its_share(config_dir):
    """Under tensor parallelism the floor is one rank's: half the weights and FLOPs of each matmul at TP=2."""
    cfg = read_model_config(str(config_dir))
    ceilings = Ceilings("test", copy_gb_s=1000.0, gemm_tflops=100.0)
    whole, half = (Roofline(cfg, torch.float16, ceilings, ranks=r) for r in (1, 2))
    assert half.layer_params * 2 == whole.layer_params and half.head_params * 2 == whole.head_params
    cost = StepCost(num_tokens=4096, num_logits=4096, kv_tokens_read=0, attention_pairs=0)
    assert half.step_seconds(cost) == pytest.approx(whole.step_seconds(cost) / 2)
