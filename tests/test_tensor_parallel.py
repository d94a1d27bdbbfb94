"""Tensor parallelism on the CPU: real worker processes over gloo, tiny random models in fp32.

Greedy tokens must be Hugging Face's at TP=2 and TP=4, with KV heads split and replicated, under
preemption; a quantized-at-load format shards too; a killed worker is an error within seconds; the
server runs with -tp 2; two "nodes" (processes) meet over the loopback. Every engine start spawns
processes, so each test starts few engines and generates few tokens.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import openai
import pytest
import torch
import transformers

from martlet import LLM, SamplingParams, distributed
from martlet.engine.executor import WorkerDiedError
from martlet.testing import make_tiny_model

PROMPT_LENGTHS = [1, 7, 15, 15, 31, 64]
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
# Spawned workers inherit this: one thread each, on a machine of few cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> tuple[Path, list[list[int]], list[list[int]]]:
    """4 heads, 2 KV heads; its prompts and HF's greedy tokens for them."""
    path = make_tiny_model(tmp_path_factory.mktemp("llama") / "model", "llama", with_tokenizer=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 4096) for _ in range(n)] for n in PROMPT_LENGTHS]
    with torch.no_grad():
        expected = [hf.generate(torch.tensor([p]), max_new_tokens=6, min_new_tokens=6, do_sample=False,
                                pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    return path, prompts, expected


def generate(llm: LLM, prompts: list[list[int]], params: SamplingParams = GREEDY):
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)


def tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def test_tp2_matches_hf_under_preemption(llama):
    """7 blocks of 16 cannot hold the batch: sequences are preempted and recomputed on both ranks."""
    path, prompts, expected = llama
    llm = LLM(str(path), device="cpu", dtype="float32", tensor_parallel_size=2, num_kv_blocks=7, quiet=True)
    try:
        assert llm.engine.runner.kv_cache.shape[3] == 1  # this rank's pool: 1 of the 2 KV heads
        outputs = generate(llm, prompts)
        assert sum(o.metrics.num_preemptions for o in outputs) > 0
        assert tokens(outputs) == expected
    finally:
        llm.engine.shutdown()
    assert all(p.exitcode == 0 for p in llm.engine.workers.processes)


def test_tp4_replicates_kv_heads_and_matches_hf(llama):
    """4 ranks over 2 KV heads: each KV head on two ranks; chunked prompts and prompt logprobs too."""
    path, prompts, expected = llama
    llm = LLM(str(path), device="cpu", dtype="float32", tensor_parallel_size=4, max_num_batched_tokens=32,
              quiet=True)
    try:
        assert llm.engine.runner.kv_cache.shape[3] == 1
        assert tokens(generate(llm, prompts)) == expected
        scored = generate(llm, prompts[3:4], SamplingParams(max_tokens=1, prompt_logprobs=0))[0].prompt_logprobs
    finally:
        llm.engine.shutdown()
    single = LLM(str(path), device="cpu", dtype="float32", quiet=True)
    reference = generate(single, prompts[3:4], SamplingParams(max_tokens=1, prompt_logprobs=0))[0].prompt_logprobs
    assert len(scored) == len(reference) == PROMPT_LENGTHS[3]
    for ours, theirs in zip(scored[1:], reference[1:]):
        assert ours.keys() == theirs.keys()
        np.testing.assert_allclose(list(ours.values()), list(theirs.values()), atol=1e-4)


def test_tp2_verifies_ngram_proposals(llama):
    """Speculative decoding: the workers run the verification steps' extra rows like any others."""
    path, _, _ = llama
    prompts = [[5, 6, 7, 8] * 6, list(range(10, 40)) * 2]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    single = tokens(generate(LLM(str(path), device="cpu", dtype="float32", quiet=True), prompts, params))
    llm = LLM(str(path), device="cpu", dtype="float32", tensor_parallel_size=2, quiet=True,
              speculative_config={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2})
    try:
        assert tokens(generate(llm, prompts, params)) == single
        assert llm.engine.num_accepted_tokens > 0
    finally:
        llm.engine.shutdown()


def test_int8_quantized_after_slicing(llama):
    """Each rank quantizes its own share at load (per output channel): the same tokens as one process."""
    path, prompts, _ = llama
    single = tokens(generate(LLM(str(path), device="cpu", dtype="float32", quantization="int8", quiet=True), prompts))
    llm = LLM(str(path), device="cpu", dtype="float32", quantization="int8", tensor_parallel_size=2, quiet=True)
    try:
        assert tokens(generate(llm, prompts)) == single
    finally:
        llm.engine.shutdown()


def prompt_logprobs(path: Path, prompt: list[int], **kwargs) -> tuple[list[float], LLM]:
    """The prompt's logprobs, and the engine, stopped (its driver's model still there to look at)."""
    llm = LLM(str(path), device="cpu", dtype="float32", quiet=True, **kwargs)
    try:
        out = generate(llm, [prompt], SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    finally:
        llm.engine.shutdown()
    return [value for row in out.prompt_logprobs[1:] for value in row.values()], llm


def test_fp8_checkpoint_shards_with_its_scales(llama, tmp_path):
    """One e4m3 scale per tensor: each rank's rows of Q, K, V keep their tensor's scale, o and down
    their whole scales. Each rank quantizes its share of the activations, so the logprobs are close,
    not equal, to one process's (measured: 0.043 apart at most, 0.055 from the unquantized model's)."""
    from safetensors.torch import load_file
    from test_w8a8 import _fp8_checkpoint

    path, prompts, _ = llama
    _fp8_checkpoint(path, tmp_path / "fp8", per_tensor=True)
    split, llm = prompt_logprobs(tmp_path / "fp8", prompts[-1], tensor_parallel_size=2)
    np.testing.assert_allclose(split, prompt_logprobs(tmp_path / "fp8", prompts[-1])[0], atol=0.05)
    # The driver's share, exactly: rows of q (heads 0-1) and of k, v (KV head 0); o's inputs 0-31.
    attention = llm.engine.runner.model.layers[1].self_attn
    file = {name.removeprefix("model.layers.1.self_attn."): t for name, t in
            load_file(tmp_path / "fp8" / "model.safetensors").items() if ".layers.1.self_attn." in name}
    codes = [file["q_proj.weight"][:32], file["k_proj.weight"][:16], file["v_proj.weight"][:16]]
    assert torch.equal(attention.qkv_proj.weight_codes.float(), torch.cat(codes).float())
    scales = [file[f"{p}_proj.weight_scale"].expand(n) for p, n in (("q", 32), ("k", 16), ("v", 16))]
    assert torch.equal(attention.qkv_proj.weight_scale[0], torch.cat(scales))
    assert torch.equal(attention.o_proj.weight_codes.float(), file["o_proj.weight"][:, :32].float())
    assert torch.equal(attention.o_proj.weight_scale[0], file["o_proj.weight_scale"].expand(64))


def test_smoothquant_factors_shard_by_input(llama, tmp_path):
    """W8A8 with SmoothQuant's pre_quant_scale: o and down fold their rank's share of it into their
    weight's columns; the norms fold all of it (measured: 0.016 from one process's logprobs at most)."""
    from test_w8a8 import _outlier_checkpoint

    path, prompts, _ = llama
    _outlier_checkpoint(path, tmp_path / "smoothed", outlier=100.0, smoothed=True)
    split, _ = prompt_logprobs(tmp_path / "smoothed", prompts[-1], quantization="w8a8", tensor_parallel_size=2)
    single, _ = prompt_logprobs(tmp_path / "smoothed", prompts[-1], quantization="w8a8")
    np.testing.assert_allclose(split, single, atol=0.05)


@pytest.mark.timeout(120)
def test_killed_worker_is_an_error_not_a_hang(llama):
    path, _, _ = llama
    llm = LLM(str(path), device="cpu", dtype="float32", tensor_parallel_size=2, quiet=True)
    worker = llm.engine.workers.processes[0]
    threading.Timer(0.5, os.kill, (worker.pid, signal.SIGKILL)).start()
    start = time.monotonic()
    with pytest.raises(WorkerDiedError, match=f"rank 1 \\(pid {worker.pid}\\) died with exit code -9"):
        generate(llm, [[5, 6]], SamplingParams(max_tokens=100_000, ignore_eos=True))
    assert time.monotonic() - start < 10
    with pytest.raises(WorkerDiedError):  # and it stays failed
        generate(llm, [[5, 6]])
    llm.engine.shutdown()


@pytest.mark.timeout(60)
def test_an_error_that_is_not_a_collective_keeps_its_own_type(llama, monkeypatch):
    """Out of memory (or a bug) in the driver's step is reported as itself, not as a hung or lost rank;
    the workers, left inside that step, are stopped, so later steps fail at once and shutdown is quick."""
    path, _, _ = llama
    llm = LLM(str(path), device="cpu", dtype="float32", tensor_parallel_size=2, quiet=True)

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(llm.engine.runner, "_launch", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError, match="simulated"):
        generate(llm, [[5, 6]])
    with pytest.raises(WorkerDiedError, match="the driver's step failed \\(OutOfMemoryError"):
        generate(llm, [[5, 6]])
    start = time.monotonic()
    llm.engine.shutdown()
    assert time.monotonic() - start < 10


@pytest.mark.timeout(120)
def test_hung_worker_times_out(llama, monkeypatch):
    """A rank that stops answering (SIGSTOP) fails the driver's next collective at the group's timeout."""
    monkeypatch.setattr(distributed, "COLLECTIVE_TIMEOUT", timedelta(seconds=3))
    path, _, _ = llama
    llm = LLM(str(path), device="cpu", dtype="float32", tensor_parallel_size=2, quiet=True)
    worker = llm.engine.workers.processes[0]
    os.kill(worker.pid, signal.SIGSTOP)
    start = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match="tensor-parallel collective failed"):
            generate(llm, [[5, 6]])
        assert time.monotonic() - start < 20
    finally:
        os.kill(worker.pid, signal.SIGKILL)
        llm.engine.shutdown()


@pytest.fixture(scope="module")
def hello(tiny_model) -> str:
    """One process's greedy text for "Hello" (6 tokens), as `martlet generate` prints it."""
    llm = LLM(str(tiny_model), device="cpu", quiet=True)
    output = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)[0]
    return output.outputs[0].text + "\n"


def generate_command(tiny_model: Path, *args: str) -> list[str]:
    return ["-m", "martlet.cli", "generate", "--model", str(tiny_model), "--prompt", "Hello", "--max-tokens", "6",
            "--device", "cpu", "--quiet", *args]


@pytest.mark.timeout(300)
def test_two_nodes_over_loopback(tiny_model, hello):
    """`--nnodes 2`: node 0 (a process) runs the engine and ranks 0-1, node 1 (another) ranks 2-3."""
    command = [sys.executable, *generate_command(tiny_model, "-tp", "4", "--nnodes", "2", "--master-port",
                                                 str(_free_port()))]
    node1 = subprocess.Popen([*command, "--node-rank", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    node0 = subprocess.run([*command, "--node-rank", "0"], capture_output=True, text=True, timeout=240)
    assert node0.returncode == 0, node0.stderr[-3000:]
    assert node1.wait(timeout=60) == 0, node1.stdout.read().decode()[-3000:]
    assert node0.stdout == hello


@pytest.mark.timeout(300)
def test_torchrun_one_process_per_rank(tiny_model, hello):
    """torchrun starts both ranks (env:// rendezvous): rank 0 runs the command, rank 1 its worker."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                str(_free_port())]
    run = subprocess.run([*torchrun, *generate_command(tiny_model, "-tp", "2")], capture_output=True, text=True,
                         timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout == hello


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(300)
def test_serve_tp2_answers_openai_client_then_503_when_a_worker_dies(tiny_model, tmp_path):
    from test_server import API_KEY, Server, greedy

    server = Server(tiny_model, tmp_path / "server.log", "--api-key", API_KEY, "-tp", "2")
    try:
        single = LLM(str(tiny_model), device="cpu", max_model_len=512, quiet=True)
        expected = single.generate("The capital of France is", greedy(6), use_tqdm=False)[0].outputs[0].text
        reply = server.client().completions.create(model="tiny", prompt="The capital of France is", max_tokens=6,
                                                   temperature=0)
        assert reply.choices[0].text == expected
        (worker,) = [pid for child in _children(server.proc.pid) for pid in _children(child)]  # the core's child
        os.kill(worker, signal.SIGKILL)
        with pytest.raises(openai.InternalServerError) as error:
            server.client().completions.create(model="tiny", prompt="Hi", max_tokens=4)
        assert error.value.status_code == 503 and "rank 1" in str(error.value)
        assert server.proc.wait(timeout=30) == 1
    finally:
        server.stop()


def _children(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("tp", [2, 4])
def test_tp_on_gpus_with_cuda_graphs_matches_hf(llama, tp):
    """NCCL, with the all-reduces and the LM head's all-gather inside the decode and mixed-step graphs."""
    if torch.cuda.device_count() < tp:
        pytest.skip(f"needs {tp} GPUs")
    path, prompts, expected = llama
    llm = LLM(str(path), dtype="float32", tensor_parallel_size=tp, num_kv_blocks=256, quiet=True)
    try:
        assert llm.engine.runner.decode_graphs is not None and llm.engine.runner.mixed_graphs is not None
        assert tokens(generate(llm, prompts)) == expected
        assert tokens(generate(llm, prompts[::-1])) == expected[::-1]  # graphs replayed again
    finally:
        llm.engine.shutdown()
