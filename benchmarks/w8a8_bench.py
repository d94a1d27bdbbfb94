"""W8A8's matmul paths at few tokens, to place `w8a8.SKINNY_MAX_TOKENS`, and its fused activation
quantization against the unfused kernels, timed as the engine runs them: inside a CUDA graph.

    PYTHONPATH=$PWD python3 benchmarks/w8a8_bench.py [--tokens 1 2 4 8 16 32 64] [--json out.json] [--only SECTION]

1. For each Llama-2-7B projection (qkv, o, gate_up, down) and token count, one graph holds the matmul
   of every decoder layer with its own weight (`gemm_graph.graph_us`). Paths: fp16 as the engine runs
   it (skinny Triton kernel up to 32 tokens, cuBLAS beyond); for fp8 and w8a8, "skinny" (the 8-bit
   codes through `skinny_linear` against fp16 activations, W8A16, up to 32 tokens) and "tc" (per-token
   codes by `quantize_rows`, then `torch._scaled_mm` / `torch._int_mm`); and weight-only int8
   (`quant_linear`, the same weight bytes) for comparison. Printed: us per matmul, GB/s of weight
   bytes, and which path is faster. The threshold is the largest token count up to which
   skinny wins on every projection. Each path is checked against the CPU-side reference first.
2. The skinny kernel's tile for 8-bit weights (`skinny_config`'s choice) against the fp16 tile and its
   K doubled and quadrupled at 3 to 5 stages, against the chosen tile with K split in 2 to 4
   slices, and with 16 rows instead of 32, at 1 and 16 tokens, fp8.
3. RMSNorm (residual fused) over 4096 with the per-token quantization fused (`rms_norm_quantized`)
   against the norm followed by `quantize_rows`. (SiLU*mul with the quantization fused was measured
   too, slower: benchmarks/results/w8a8-H200-2026-12-02.md.)
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from gemm_graph import graph_us  # this script's directory is on sys.path
from gemm_sweep import layer_shapes

from martlet.kernels.linear import MAX_TOKENS, skinny_config, skinny_linear
from martlet.kernels.norm import rms_norm, rms_norm_quantized
from martlet.kernels.quant_linear import quant_linear
from martlet.kernels.quantize import quantize_rows
from martlet.layers.kv_cache import dequantize, quantize
from martlet.layers.linear import Linear
from martlet.layers.quantization import from_name, packed
from martlet.layers.quantization.packed import PackedFormat
from martlet.layers.quantization.w8a8 import QuantizedRows

FORMATS = ("fp8", "w8a8")


def w8a8_layers(n: int, k: int, name: str, layers: int) -> list[Linear]:
    out = []
    for _ in range(layers):
        with torch.device("cuda"):
            layer = Linear(k, n, bias=False, quant=from_name(name))
        layer.weight.data = torch.randn(n, k, device="cuda", dtype=torch.float16) / k**0.5
        layer.method.process_weights_after_loading(layer)
        out.append(layer)
    return out


def skinny(x: torch.Tensor, layer: Linear, config=None) -> torch.Tensor:
    return skinny_linear(x, layer.weight_codes, config=config, weight_scale=layer.weight_scale[0])


def tensor_cores(x: torch.Tensor, layer: Linear) -> torch.Tensor:
    return layer.method.apply(layer, QuantizedRows(*quantize_rows(x, layer.method.format), x.dtype))


def fp16_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return skinny_linear(x, w) if x.shape[0] <= MAX_TOKENS else F.linear(x, w)


def check(x: torch.Tensor, layer: Linear, out: torch.Tensor, quantized_x: bool) -> None:
    """out against fp32 arithmetic on the same codes (and the reference's activation codes for "tc")."""
    weight = dequantize(layer.weight_codes, layer.weight_scale[0])
    ref = (dequantize(*quantize(x, layer.method.format, torch.float32)) if quantized_x else x.float()) @ weight.T
    err = ((out.float() - ref).norm() / ref.norm()).item()
    assert err < 2e-2, f"relative error {err:.3f}"


def matmuls(config: dict, tokens: list[int], layers: int) -> list[dict]:
    rows = []
    for name, (n, k) in layer_shapes(config).items():
        fp16_ws = [torch.randn(n, k, device="cuda", dtype=torch.float16) / k**0.5 for _ in range(layers)]
        formats = {f: w8a8_layers(n, k, f, layers) for f in FORMATS}
        int8_fmt = PackedFormat(8, k, False)
        int8_wo = [packed.quantize(w, int8_fmt, torch.float16) for w in fp16_ws]
        for m in tokens:
            xs = [torch.randn(m, k, device="cuda", dtype=torch.float16) for _ in range(layers)]
            fp16_us = graph_us(fp16_matmul, xs, fp16_ws)
            line = [f"{name:8s} n{n:6d} k{k:6d} m{m:3d}  fp16 {fp16_us:7.1f} us"]
            if m <= MAX_TOKENS:  # the weight-only int8 kernel on the same bytes, for comparison
                int8_wo_us = graph_us(lambda x, w, fmt=int8_fmt: quant_linear(x, *w, fmt), xs, int8_wo)
                line.append(f"int8 weight-only {int8_wo_us:7.1f}")
                rows.append({"layer": name, "n": n, "k": k, "m": m, "format": "int8_weight_only", "us": int8_wo_us})
            for f, ls in formats.items():
                row = {"layer": name, "n": n, "k": k, "m": m, "format": f, "fp16_us": fp16_us}
                check(xs[0], ls[0], tensor_cores(xs[0], ls[0]), quantized_x=True)
                row["tc_us"] = graph_us(tensor_cores, xs, ls)
                text = f"{f} tc {row['tc_us']:7.1f}"
                if m <= MAX_TOKENS:
                    check(xs[0], ls[0], skinny(xs[0], ls[0]), quantized_x=False)
                    row["skinny_us"] = graph_us(skinny, xs, ls)
                    row["skinny_gb_s"] = n * k / row["skinny_us"] / 1e3
                    text += (f" skinny {row['skinny_us']:7.1f} ({row['skinny_gb_s']:5.0f} GB/s, "
                             f"{fp16_us / row['skinny_us']:4.2f}x fp16)")
                line.append(text)
                rows.append(row)
            print("  ".join(line), flush=True)
    for f in FORMATS:
        wins = [m for m in tokens if all(r.get("skinny_us", float("inf")) <= r["tc_us"]
                                         for r in rows if r["format"] == f and r["m"] == m)]
        below = [m for m in tokens if all(w in wins for w in tokens if w <= m)]
        print(f"{f}: skinny at least as fast on every projection up to {max(below, default=0)} tokens "
              f"(wins at {wins})", flush=True)
    return rows


def skinny_tiles(config: dict, layers: int) -> list[dict]:
    rows = []
    for name, (n, k) in layer_shapes(config).items():
        ls = w8a8_layers(n, k, "fp8", layers)
        for m in (1, 16):
            xs = [torch.randn(m, k, device="cuda", dtype=torch.float16) for _ in range(layers)]
            fp16_tile = skinny_config(n, torch.float16, xs[0].device)
            chosen = skinny_config(n, torch.float16, xs[0].device, torch.float8_e4m3fn)
            candidates = [chosen] + [
                replace(fp16_tile, block_k=fp16_tile.block_k * f, num_stages=s) for f in (1, 2, 4) for s in (3, 4, 5)
            ] + [replace(chosen, split_k=s) for s in (2, 3, 4)] + [
                replace(chosen, block_n=16, num_stages=s) for s in (4, 5)  # twice the programs of 32 rows
            ]
            timed = []
            for cfg in candidates:
                try:
                    timed.append((graph_us(lambda x, w, cfg=cfg: skinny(x, w, cfg), xs, ls), cfg))
                except Exception as e:  # a tile over shared memory: skip it
                    print(f"  {cfg}: {type(e).__name__}", flush=True)
            best_us, best = min(timed, key=lambda t: t[0])
            print(f"{name:8s} m{m:3d} fp8 skinny default {timed[0][0]:7.1f} us; best {best_us:7.1f} us {best}",
                  flush=True)
            rows.append({"layer": name, "m": m, "default_us": timed[0][0], "best_us": best_us, "best": asdict(best)})
    return rows


def fused_quantization(tokens: list[int], layers: int) -> list[dict]:
    rows = []
    fmt = from_name("fp8").format
    weight = torch.ones(4096, device="cuda", dtype=torch.float16)
    cases = {  # name: (the input's width, unfused, fused); each takes (x, residual)
        "norm": (4096, lambda x, r: quantize_rows(rms_norm(x, weight, 1e-5, r), fmt),
                 lambda x, r: rms_norm_quantized(x, weight, 1e-5, fmt, r)),
    }
    for m in tokens:
        for name, (width, unfused, fused) in cases.items():
            xs = [torch.randn(m, width, device="cuda", dtype=torch.float16) for _ in range(layers)]
            residuals = [torch.randn(m, width, device="cuda", dtype=torch.float16) for _ in range(layers)]
            unfused_us, fused_us = graph_us(unfused, xs, residuals), graph_us(fused, xs, residuals)
            print(f"{name} m{m:5d}: unfused {unfused_us:6.1f} us, fused {fused_us:6.1f} us "
                  f"({unfused_us / fused_us:4.2f}x)", flush=True)
            rows.append({"kernel": name, "m": m, "unfused_us": unfused_us, "fused_us": fused_us})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config-dir", default="benchmarks/models/llama-2-7b")
    ap.add_argument("--tokens", type=int, nargs="*", default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--only", choices=["matmuls", "skinny_tiles", "fused_quantization"])
    args = ap.parse_args()
    config = json.loads((Path(args.config_dir) / "config.json").read_text())
    layers = config["num_hidden_layers"]
    print(f"{torch.cuda.get_device_name()}: {layers} matmuls per graph", flush=True)
    sections = {"matmuls": lambda: matmuls(config, args.tokens, layers),
                "skinny_tiles": lambda: skinny_tiles(config, layers),
                "fused_quantization": lambda: fused_quantization([16, 64, 256, 2048], layers)}
    results = {"gpu": torch.cuda.get_device_name()}
    for name, run in sections.items():
        if args.only in (None, name):
            results[name] = run()
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
