"""The hardware's own limits, measured in the same run, and the fastest a run could have gone.

A step must read every weight once (plus the KV cache of every context it attends to) and do
2 FLOPs per weight per token (plus attention). Its floor is the larger of bytes over the measured
copy bandwidth and FLOPs over the measured GEMM rate; a run's floor is the sum over the steps it
actually ran. "Roofline %" is that floor over the measured time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from martlet.config import ModelConfig
from martlet.engine.model_runner import num_sampled
from martlet.engine.scheduler import ScheduledBatch


@dataclass
class Ceilings:
    device: str
    copy_gb_s: float  # bytes read + written per second, /1e9
    gemm_tflops: float  # in the model's dtype, or on 8-bit tensor cores for W8A8

    def as_dict(self) -> dict:
        return asdict(self)


def _time_ms(fn, device: torch.device, repeats: int) -> float:
    """Median time of `fn` after a warm-up, with device events on a GPU."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


def measure_ceilings(device: torch.device, dtype: torch.dtype, quantization: str | None = None) -> Ceilings:
    """Copy bandwidth (2 GiB on a GPU) and square-GEMM rate (8192 on a GPU), on random data. The GEMM
    is the one the model's matmuls run: in `dtype`, or on 8-bit tensor cores for W8A8."""
    on_gpu = device.type == "cuda"
    n_copy = (1 << 29) if on_gpu else (1 << 24)  # fp32 elements: 2 GiB / 64 MiB
    src = torch.randn(n_copy, device=device)
    dst = torch.empty_like(src)
    copy_ms = _time_ms(lambda: dst.copy_(src), device, 20)
    n = 8192 if on_gpu else 1024
    gemm = _square_gemm(n, device, dtype if on_gpu else torch.float32, quantization if on_gpu else None)
    gemm_ms = _time_ms(gemm, device, 10)
    name = torch.cuda.get_device_name(device) if on_gpu else "cpu"
    return Ceilings(name, 2 * n_copy * 4 / copy_ms / 1e6, 2 * n**3 / gemm_ms / 1e9)


def _square_gemm(n: int, device: torch.device, dtype: torch.dtype, quantization: str | None) -> Callable[[], object]:
    """An n x n x n product as the model runs its matmuls: W8A8 ("fp8", "w8a8") calls the 8-bit tensor
    cores as `layers/quantization/w8a8.py` does."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    if quantization == "fp8":
        a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
        scale_a, scale_b = torch.ones(n, 1, device=device), torch.ones(1, n, device=device)
        return lambda: torch._scaled_mm(a8, b8.T, scale_a=scale_a, scale_b=scale_b, out_dtype=dtype)
    if quantization == "w8a8":
        a8, b8 = (t.clamp(-127, 127).to(torch.int8) for t in (a, b))
        return lambda: torch._int_mm(a8, b8.T)
    return lambda: a @ b


@dataclass
class StepCost:
    num_tokens: int
    num_logits: int  # tokens that go through the LM head (one per sequence that gets a token)
    kv_tokens_read: int  # context tokens whose K/V the step's attention reads
    attention_pairs: int  # (query, key) pairs attended, causal


def step_cost(batch: ScheduledBatch) -> StepCost:
    """Called before the step runs, while num_computed_tokens still counts the cached context."""
    logits, kv, pairs = 0, 0, 0
    for seq, n in zip(batch.seqs, batch.num_new_tokens):
        ctx = seq.num_computed_tokens + n
        logits += num_sampled(seq, n)
        kv += ctx
        pairs += n * seq.num_computed_tokens + n * (n + 1) // 2
    return StepCost(batch.num_tokens, logits, kv, pairs)


def layer_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the decoder layers' matmul weights as stored: a quantized format's codes, scales and
    offsets, which is what a step streams."""
    from martlet.layers.linear import Linear

    return sum(t.numel() * t.element_size() for layer in model.layers for module in layer.modules()
               if isinstance(module, Linear) for t in (*module.parameters(), *module.buffers()))


class Roofline:
    def __init__(
        self, cfg: ModelConfig, dtype: torch.dtype, ceilings: Ceilings, layer_bytes: int | None = None,
        kv_bytes_per_token: int | None = None, ranks: int = 1,
    ) -> None:
        """`layer_bytes`: the decoder layers' weight bytes (`layer_weight_bytes`) when they are not
        stored in `dtype`, as under quantization; `kv_bytes_per_token`: K and V of every layer as
        the cache stores them (an 8-bit cache's codes and scales), when not in `dtype`. Both are
        one rank's under tensor parallelism (`ranks`), whose floor is one rank's share of the work:
        the ranks run side by side, and the all-reduces between them are not counted."""
        element = torch.tensor([], dtype=dtype).element_size()
        q, kv = cfg.num_heads * cfg.head_dim // ranks, max(cfg.num_kv_heads // ranks, 1) * cfg.head_dim
        mlp = cfg.intermediate_size // ranks
        per_layer = cfg.hidden_size * (q + 2 * kv) + q * cfg.hidden_size + 3 * cfg.hidden_size * mlp
        # Matmul weights: what every step must read and multiply (the embedding is only gathered).
        self.layer_params = cfg.num_layers * per_layer
        self.head_params = cfg.vocab_size * cfg.hidden_size // ranks
        layer_bytes = self.layer_params * element if layer_bytes is None else layer_bytes
        self.weight_bytes = layer_bytes + self.head_params * element
        self.kv_bytes_per_token = kv_bytes_per_token or 2 * cfg.num_layers * kv * element
        self.attention_flops_per_pair = 4 * cfg.num_layers * q  # QK^T and PV, 2 FLOPs per MAC
        self.ceilings = ceilings

    def step_seconds(self, cost: StepCost) -> float:
        bytes_moved = self.weight_bytes + cost.kv_tokens_read * self.kv_bytes_per_token
        flops = (2 * self.layer_params * cost.num_tokens + 2 * self.head_params * cost.num_logits
                 + self.attention_flops_per_pair * cost.attention_pairs)
        return max(bytes_moved / (self.ceilings.copy_gb_s * 1e9), flops / (self.ceilings.gemm_tflops * 1e12))

    def run_seconds(self, costs: list[StepCost]) -> float:
        return sum(self.step_seconds(c) for c in costs)
