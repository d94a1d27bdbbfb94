"""The packed-weight matmul against the fp16 one, timed as the engine runs them: inside a CUDA graph.

    PYTHONPATH=$PWD python3 benchmarks/quant_linear_bench.py [--tokens 1 2 4 8 16 32 64 128 256] [--sweep]

For each Llama-2-7B linear layer (qkv, o, gate_up, down, and gate_up again as the engine runs it,
with SiLU(gate) * up fused where the kernels take it) and token count, one graph holds the
matmul of every decoder layer with its own weight (`gemm_graph.graph_us`). Formats: fp16 (the
engine's: the skinny Triton kernel up to 32 tokens, cuBLAS beyond), int8 (per channel), int4
(groups of 128, asymmetric), and GGUF Q4_0 / Q4_K as they are repacked (groups of 32, symmetric /
asymmetric). Printed: us per matmul, GB/s in the format's own bytes (codes + scales + offsets),
speed-up over fp16. Beyond `quant_linear.kernel_max_tokens` the packed path is dequantize + cuBLAS,
as in the engine. `--sweep` also times a grid of tiles per row (the gated one too) where the engine
takes the kernel, and prints the best, against the one `quant_linear_config` picks; past MAX_TOKENS,
GEMM-sized tiles of the tensor-core kernel against dequantize + cuBLAS. Slow: give it few --tokens
and --formats. Each kernel is checked against the PyTorch reference first.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
import triton
from gemm_graph import graph_us  # this script's directory is on sys.path
from gemm_sweep import layer_shapes

from martlet.bench.roofline import measure_ceilings
from martlet.kernels import quant_linear as ql
from martlet.kernels.quant_linear import (
    GEMV_MAX_TOKENS,
    MAX_TOKENS,
    QuantLinearConfig,
    quant_linear,
    quant_linear_config,
)
from martlet.layers.activation import silu_and_mul
from martlet.layers.linear import UnquantizedLinearMethod
from martlet.layers.quantization import packed
from martlet.layers.quantization.base import LinearMethod
from martlet.layers.quantization.packed import PackedFormat
from martlet.layers.quantization.rtn import RoundToNearestMethod

FORMATS = {
    "int8": lambda k: PackedFormat(8, k, False),
    "int4": lambda k: PackedFormat(4, 128, True),
    "q4_0": lambda k: PackedFormat(4, 32, False),
    "q4_k": lambda k: PackedFormat(4, 32, True),
}
def sweep_configs(m: int, fmt: PackedFormat) -> list[QuantLinearConfig]:
    """Tiles to try at m tokens: up to GEMV_MAX_TOKENS the FMA kernel's, else tensor cores' (GEMM-sized
    ones past MAX_TOKENS)."""
    per_byte = 8 // fmt.bits
    # The tensor-core kernel takes a step of at most a group over long groups (`tensor_core_steps`), so
    # row lengths past the group are the same tile: each is timed once.
    block_m = 16 if m <= 16 else 32
    tensor_core = list(dict.fromkeys(
        QuantLinearConfig(block_m, bn, ql.tensor_core_steps(fmt, 4096, row_bytes * per_byte)[1], w, s, split_k)
        for bn in (32, 64) for row_bytes in (64, 128, 256) for w in (4, 8) for s in (2, 3, 4) for split_k in (1, 2, 4)
        if split_k == 1 or (w == 4 and s > 2)))  # K split too: more programs for the narrow weights
    if m > MAX_TOKENS:  # where the engine dequantizes for cuBLAS: GEMM tiles that unpack in registers
        return [QuantLinearConfig(bm, bn, row_bytes * per_byte, w, s) for bm in (64, 128) for bn in (64, 128)
                for row_bytes in (32, 64) for w in (4, 8) for s in (3, 4)]
    if m <= GEMV_MAX_TOKENS:
        block_m = triton.next_power_of_2(m)
        # K split in 2 or 4 as well: twice or four times the programs, for the narrow weights (o, down);
        # past one token, tensor-core tiles too (rows padded to 16: the FMA kernel's work grows with m).
        return [QuantLinearConfig(block_m, bn, row_bytes * per_byte, w, s)
                for bn in (8, 16, 32) for row_bytes in (128, 256, 512) for w in (2, 4) for s in (3, 4)] + [
                QuantLinearConfig(block_m, bn, row_bytes * per_byte, 4, 3, split_k)
                for split_k in (2, 4) for bn in (8, 16, 32) for row_bytes in (256, 512)] + [
                c for c in tensor_core if m > 1 and c.num_warps == 4 and c.num_stages > 2]
    return tensor_core


def packed_weights(n: int, k: int, fmt: PackedFormat, layers: int) -> list[tuple]:
    out = []
    for _ in range(layers):
        qweight, scales, offsets = packed.quantize(torch.randn(n, k, device="cuda") / k**0.5, fmt, torch.float16)
        out.append((qweight, scales, offsets))
    return out


def nbytes(weight: tuple) -> int:
    return sum(t.numel() * t.element_size() for t in weight if t is not None)


def fp16_matmul(x: torch.Tensor, w: torch.Tensor, gated: bool = False) -> torch.Tensor:
    """As the engine's fp16 layers run (their LinearMethod); `gated`: a [gate; up] weight, SiLU(gate) * up."""
    return _engine_matmul(UnquantizedLinearMethod(), SimpleNamespace(weight=w, bias=None), x, gated)


def packed_matmul(x: torch.Tensor, w: tuple, fmt: PackedFormat, gated: bool = False) -> torch.Tensor:
    """As the engine's packed layers run: the kernel for few tokens, dequantize + cuBLAS beyond."""
    method = RoundToNearestMethod("int4", "bench")  # any packed method: `apply` reads only its format
    method.format = fmt
    qweight, scales, offsets = w
    layer = SimpleNamespace(qweight=qweight, scales=scales, offsets=offsets, bias=None, input_perm=None)
    return _engine_matmul(method, layer, x, gated)


def _engine_matmul(method: LinearMethod, layer: SimpleNamespace, x: torch.Tensor, gated: bool) -> torch.Tensor:
    return method.apply_silu_and_mul(layer, x) if gated else method.apply(layer, x)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config-dir", default="benchmarks/models/llama-2-7b")
    ap.add_argument("--tokens", type=int, nargs="*", default=[1, 2, 4, 8, 16, 32, 64, 128, 256])
    ap.add_argument("--formats", nargs="*", default=list(FORMATS))
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    config = json.loads((Path(args.config_dir) / "config.json").read_text())
    layers = config["num_hidden_layers"]
    ceilings = measure_ceilings(torch.device("cuda"), torch.float16)
    print(f"{torch.cuda.get_device_name()}: copy {ceilings.copy_gb_s:.0f} GB/s; {layers} matmuls per graph", flush=True)
    rows = []
    shapes = layer_shapes(config)
    # gate_up once more as the engine runs it, SiLU(gate) * up fused where the kernels take it.
    for name, (n, k) in [*shapes.items(), ("gate_up+silu", shapes["gate_up"])]:
        gated = name.endswith("+silu")
        fp16_ws = [torch.randn(n, k, device="cuda", dtype=torch.float16) / k**0.5 for _ in range(layers)]
        weights = {f: packed_weights(n, k, FORMATS[f](k), layers) for f in args.formats}
        for m in args.tokens:
            xs = [torch.randn(m, k, device="cuda", dtype=torch.float16) for _ in range(layers)]
            fp16_us = graph_us(lambda x, w, gated=gated: fp16_matmul(x, w, gated), xs, fp16_ws)
            line = [f"{name:8s} n{n:6d} k{k:6d} m{m:4d}  fp16 {fp16_us:7.1f} us {2 * n * k / fp16_us / 1e3:6.0f} GB/s"]
            for f, ws in weights.items():
                fmt = FORMATS[f](k)
                qweight, scales, offsets = ws[0]
                offsets = None if offsets is None else offsets.float()
                reference = F.linear(xs[0].float(), packed.dequantize(qweight, scales.float(), offsets, fmt))
                reference = silu_and_mul(reference) if gated else reference
                torch.testing.assert_close(packed_matmul(xs[0], ws[0], fmt, gated).float(), reference, atol=5e-2,
                                           rtol=2e-2)
                kernel_us = graph_us(lambda x, w, fmt=fmt, gated=gated: packed_matmul(x, w, fmt, gated), xs, ws)
                row = {"layer": name, "n": n, "k": k, "m": m, "format": f, "fp16_us": fp16_us, "kernel_us": kernel_us,
                       "gb_s": nbytes(ws[0]) / kernel_us / 1e3}
                if m <= ql.kernel_max_tokens(fmt):
                    row["config"] = asdict(quant_linear_config(m, n, k, fmt, gated))
                line.append(f"{f} {kernel_us:7.1f} us {row['gb_s']:6.0f} GB/s {fp16_us / kernel_us:4.2f}x")
                if args.sweep:
                    timed = []
                    for c in sweep_configs(m, fmt):
                        try:
                            timed.append((graph_us(lambda x, w, fmt=fmt, c=c, gated=gated: quant_linear(
                                x, *w, fmt, config=c, silu_and_mul=gated), xs, ws), c))
                        except Exception as e:  # a tile over shared memory or registers: skip it
                            print(f"  {c}: {type(e).__name__}", flush=True)
                    best_us, best = min(timed, key=lambda t: t[0])
                    row["best_us"], row["best_config"] = best_us, asdict(best)
                    row["sweep"] = [(us, asdict(c)) for us, c in sorted(timed, key=lambda t: t[0])]
                    line.append(f"[best {best_us:7.1f} us {best}]")
                rows.append(row)
            print("  ".join(line), flush=True)
            if args.json:  # after every row: a run stopped by its time limit keeps what it measured
                args.json.write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "ceilings": ceilings.as_dict(),
                                                 "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
