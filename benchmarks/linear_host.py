"""Host time of one cuBLAS call (F.linear) the first time a token count M is seen, and after.

    python3 benchmarks/linear_host.py

For the four Llama-2-7B projection shapes: host microseconds per call (no sync inside the timed loop)
for 100 new values of M, the same 100 again, and two other sets of new values. The first call per
shape pays for cuBLAS's algorithm choice; an eager mixed step, whose token count changes from step
to step, pays it for most of its matmuls.
"""

import time

import torch
import torch.nn.functional as F

SHAPES = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)}


def host_us(weights: dict, inputs: dict, token_counts) -> dict[str, float]:
    token_counts = list(token_counts)
    out = {}
    for name in SHAPES:
        start = time.perf_counter()
        for m in token_counts:
            F.linear(inputs[name][:m], weights[name])
        out[name] = round(1e6 * (time.perf_counter() - start) / len(token_counts), 1)
        torch.cuda.synchronize()
    return out


def main() -> None:
    weights = {k: torch.randn(n, kk, device="cuda", dtype=torch.float16) for k, (n, kk) in SHAPES.items()}
    inputs = {k: torch.randn(8192, kk, device="cuda", dtype=torch.float16) for k, (n, kk) in SHAPES.items()}
    F.linear(inputs["o"][:64], weights["o"])
    torch.cuda.synchronize()
    print("first call per M (300-399), host us per call:", host_us(weights, inputs, range(300, 400)))
    print("same M again, host us per call:              ", host_us(weights, inputs, range(300, 400)))
    print("fresh M 1000-1099:                            ", host_us(weights, inputs, range(1000, 1100)))
    print("fresh multiples of 64 (64..6400):             ", host_us(weights, inputs, range(64, 6401, 64)))


if __name__ == "__main__":
    main()
