"""The model's matmuls at a few token counts, timed as the engine runs them: inside a CUDA graph.

    PYTHONPATH=$PWD python3 benchmarks/gemm_graph.py [--tokens 16 24 32] [--config-dir DIR]

For each Llama linear layer (qkv, o, gate_up, down) one graph holds the matmul of every decoder
layer, each with its own weight (so nothing is served from L2 that the engine would not find
there), and is replayed after a warm-up. Candidates: cuBLAS (F.linear) and the few-token Triton
kernel (`martlet.kernels.linear`) with several tile configs (some with K split in slices), among them
the one `skinny_config` picks.
Printed per layer and candidate: us per matmul and % of its floor (`floor_us`: at these few tokens,
the weight bytes at copy bandwidth).
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from gemm_sweep import layer_shapes  # this script's directory is on sys.path

from martlet.bench.roofline import Ceilings, measure_ceilings
from martlet.kernels.linear import SkinnyConfig, skinny_config, skinny_linear

CONFIGS = [SkinnyConfig(n, k, w, s) for n in (16, 32, 64) for k in (128, 256) for w in (2, 4) for s in (3, 4, 5)] + [
    SkinnyConfig(32, k, w, s, split) for k in (128, 256) for w in (2, 4) for s in (4, 5) for split in (2, 4)]


def layer_operands(m: int, n: int, k: int, layers: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """fp16 inputs [m, k] and weights [n, k], one of each per decoder layer: each matmul of a graph
    reads its own weight, as the engine's do."""
    ws = [torch.randn(n, k, device="cuda", dtype=torch.float16) / k**0.5 for _ in range(layers)]
    xs = [torch.randn(m, k, device="cuda", dtype=torch.float16) for _ in range(layers)]
    return xs, ws


def floor_us(m: int, n: int, k: int, ceilings: Ceilings) -> float:
    """One fp16 matmul's floor: max(weight bytes at copy, FLOPs at the GEMM rate), in us."""
    return max(2 * n * k / ceilings.copy_gb_s / 1e3, 2 * m * n * k / ceilings.gemm_tflops / 1e6)


def graph_us(fn, xs: list[torch.Tensor], ws: list[torch.Tensor], replays: int = 20) -> float:
    """us per matmul: one graph of len(ws) matmuls, median replay time."""
    for x, w in zip(xs, ws):  # compile and warm up outside the capture
        fn(x, w)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for x, w in zip(xs, ws):
            fn(x, w)
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return 1e3 * sorted(times)[len(times) // 2] / len(ws)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config-dir", default="benchmarks/models/llama-2-7b")
    ap.add_argument("--tokens", type=int, nargs="*", default=[16, 24, 32])
    args = ap.parse_args()
    config = json.loads((Path(args.config_dir) / "config.json").read_text())
    layers = config["num_hidden_layers"]
    ceilings = measure_ceilings(torch.device("cuda"), torch.float16)
    print(f"{torch.cuda.get_device_name()}: copy {ceilings.copy_gb_s:.0f} GB/s; {layers} matmuls per graph",
          flush=True)
    for m in args.tokens:
        totals: dict[str, float] = {}
        for name, (n, k) in layer_shapes(config).items():
            xs, ws = layer_operands(m, n, k, layers)
            floor = floor_us(m, n, k, ceilings)
            chosen = skinny_config(n, torch.float16, xs[0].device)
            got = skinny_linear(xs[0], ws[0], config=chosen)
            torch.testing.assert_close(got, F.linear(xs[0], ws[0]), atol=2e-2, rtol=2e-2)
            results = {"cuBLAS": graph_us(F.linear, xs, ws)}
            for cfg in CONFIGS:
                try:
                    fn = partial(skinny_linear, config=cfg)
                    results[str(tuple(vars(cfg).values()))] = graph_us(fn, xs, ws)
                except Exception as e:  # out of shared memory
                    print(f"  {cfg}: {type(e).__name__}")
            for key, us in results.items():
                totals[key] = totals.get(key, 0.0) + us
            ranked = sorted(results.items(), key=lambda kv: kv[1])
            mine = results[str(tuple(vars(chosen).values()))]
            totals["chosen per shape"] = totals.get("chosen per shape", 0.0) + mine
            print(f"M={m:3d} {name:8s} floor {floor:6.1f} us | cuBLAS {results['cuBLAS']:6.1f} "
                  f"({floor / results['cuBLAS']:.0%}) | skinny_config {mine:.1f} ({floor / mine:.0%}) | best " +
                  ", ".join(f"{key} {us:.1f} ({floor / us:.0%})" for key, us in ranked[:3]), flush=True)
            del ws, xs
        ranked = sorted(totals.items(), key=lambda kv: kv[1])
        print(f"M={m:3d} per decoder layer: cuBLAS {totals['cuBLAS']:.1f} us, skinny_config's tiles "
              f"{totals.pop('chosen per shape'):.1f} us; best single config " +
              ", ".join(f"{key} {us:.1f}" for key, us in ranked[:4]), flush=True)


if __name__ == "__main__":
    main()
