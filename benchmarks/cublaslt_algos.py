"""Does cuBLASLt have a better kernel for the model's matmuls than the one its heuristic picks first?

    PYTHONPATH=$PWD python3 benchmarks/cublaslt_algos.py [--tokens 128 192 256 ...] [--algos 32]

cuBLAS runs the first algorithm its heuristic ranks for a shape. cuBLASLt can list more of them
(`cublasLtMatmulAlgoGetHeuristic`); PyTorch does not expose that list, so this probe calls cuBLASLt
through ctypes, times every listed algorithm as `gemm_graph.py` times a candidate (one CUDA graph of
one matmul per decoder layer, each with its own weight), and checks each result against F.linear.
Printed per token count and layer shape: the floor (max of weight bytes at copy and FLOPs at the
GEMM rate), F.linear, the heuristic's first algorithm, and the best of the list with its rank.
"""

from __future__ import annotations

import argparse
import ctypes
import json
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from gemm_graph import floor_us, graph_us, layer_operands  # this script's directory is on sys.path
from gemm_sweep import layer_shapes

from martlet.bench.roofline import measure_ceilings

# From cublasLt.h / library_types.h (CUDA 12 and 13).
COMPUTE_32F, R_16F, R_32F = 68, 2, 0
DESC_TRANSA, DESC_TRANSB = 3, 4
OP_N, OP_T = 0, 1
PREF_MAX_WORKSPACE_BYTES = 1
WORKSPACE_BYTES = 32 << 20


class HeuristicResult(ctypes.Structure):
    _fields_ = [("algo", ctypes.c_uint64 * 8), ("workspace_size", ctypes.c_size_t), ("state", ctypes.c_int),
                ("waves_count", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


class CublasLt:
    """The cuBLASLt library PyTorch itself loaded (its wheel's copy), with one handle and one
    workspace that every product shares."""

    def __init__(self) -> None:
        torch.ones(8, 8, device="cuda", dtype=torch.float16) @ torch.ones(8, 8, device="cuda", dtype=torch.float16)
        paths = [line.split()[-1] for line in open("/proc/self/maps") if "libcublasLt.so" in line]
        if not paths:
            raise RuntimeError("PyTorch has not loaded cuBLASLt: is this a CUDA build?")
        self.lib = ctypes.CDLL(paths[0])
        self.handle = ctypes.c_void_p()
        check(self.lib.cublasLtCreate(ctypes.byref(self.handle)))
        self.workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device="cuda")


class LtMatmul:
    """y [M, N] = x [M, K] @ w [N, K]^T in fp16 with fp32 accumulation, as cuBLASLt's column-major
    D [N, M] = op_T(A [K, N]) @ B [K, M], the problem PyTorch hands cuBLAS for F.linear."""

    def __init__(self, lt: CublasLt, m: int, n: int, k: int, max_algos: int) -> None:
        self.lt, self.m, self.n = lt, m, n
        lib = lt.lib
        self.desc = ctypes.c_void_p()
        check(lib.cublasLtMatmulDescCreate(ctypes.byref(self.desc), COMPUTE_32F, R_32F))
        for attr, op in ((DESC_TRANSA, OP_T), (DESC_TRANSB, OP_N)):
            value = ctypes.c_int32(op)
            check(lib.cublasLtMatmulDescSetAttribute(self.desc, attr, ctypes.byref(value), ctypes.c_size_t(4)))
        self.a, self.b, self.d = (self._layout(rows, cols) for rows, cols in ((k, n), (k, m), (n, m)))
        pref = ctypes.c_void_p()
        check(lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)))
        ws = ctypes.c_uint64(WORKSPACE_BYTES)
        check(lib.cublasLtMatmulPreferenceSetAttribute(pref, PREF_MAX_WORKSPACE_BYTES, ctypes.byref(ws),
                                                     ctypes.c_size_t(8)))
        results = (HeuristicResult * max_algos)()
        found = ctypes.c_int()
        check(lib.cublasLtMatmulAlgoGetHeuristic(lt.handle, self.desc, self.a, self.b, self.d, self.d, pref,
                                                 max_algos, results, ctypes.byref(found)))
        self.algos = [results[i] for i in range(found.value) if results[i].state == 0]
        self.alpha, self.beta = ctypes.c_float(1.0), ctypes.c_float(0.0)

    def _layout(self, rows: int, cols: int) -> ctypes.c_void_p:
        layout = ctypes.c_void_p()
        check(self.lt.lib.cublasLtMatrixLayoutCreate(ctypes.byref(layout), R_16F, ctypes.c_uint64(rows),
                                                  ctypes.c_uint64(cols), ctypes.c_int64(rows)))
        return layout

    def __call__(self, x: torch.Tensor, w: torch.Tensor, algo: int) -> torch.Tensor:
        y = torch.empty(self.m, self.n, dtype=x.dtype, device=x.device)
        result = self.algos[algo]
        check(self.lt.lib.cublasLtMatmul(
            self.lt.handle, self.desc, ctypes.byref(self.alpha), ctypes.c_void_p(w.data_ptr()), self.a,
            ctypes.c_void_p(x.data_ptr()), self.b, ctypes.byref(self.beta), ctypes.c_void_p(y.data_ptr()), self.d,
            ctypes.c_void_p(y.data_ptr()), self.d, ctypes.byref(result.algo),
            ctypes.c_void_p(self.lt.workspace.data_ptr()), ctypes.c_size_t(result.workspace_size),
            ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)))
        return y


def check(status: int) -> None:
    if status != 0:
        raise RuntimeError(f"cuBLASLt status {status}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config-dir", default="benchmarks/models/llama-2-7b")
    ap.add_argument("--tokens", type=int, nargs="*", default=[64, 128, 192, 256, 320, 384])
    ap.add_argument("--algos", type=int, default=32, help="how many algorithms to ask the heuristic for")
    args = ap.parse_args()
    config = json.loads((Path(args.config_dir) / "config.json").read_text())
    layers = config["num_hidden_layers"]
    ceilings = measure_ceilings(torch.device("cuda"), torch.float16)
    cublaslt = CublasLt()
    print(f"{torch.cuda.get_device_name()}: copy {ceilings.copy_gb_s:.0f} GB/s, GEMM {ceilings.gemm_tflops:.0f} "
          f"TFLOP/s; {cublaslt.lib._name}", flush=True)
    for m in args.tokens:
        totals = {"floor": 0.0, "F.linear": 0.0, "first": 0.0, "best": 0.0}
        for name, (n, k) in layer_shapes(config).items():
            xs, ws = layer_operands(m, n, k, layers)
            lt = LtMatmul(cublaslt, m, n, k, args.algos)
            times = []
            for i in range(len(lt.algos)):
                try:
                    torch.testing.assert_close(lt(xs[0], ws[0], i), F.linear(xs[0], ws[0]), atol=2e-2, rtol=2e-2)
                    times.append(graph_us(partial(lt, algo=i), xs, ws))
                except (RuntimeError, AssertionError) as e:
                    print(f"  {name} algo {i}: {type(e).__name__} {str(e)[:80]}")
                    times.append(float("inf"))
            row = {"floor": floor_us(m, n, k, ceilings),
                   "F.linear": graph_us(F.linear, xs, ws), "first": times[0], "best": min(times)}
            for key, t in row.items():
                totals[key] += t
            print(f"M={m} {name:8s} " + " ".join(f"{key} {t:6.1f}" for key, t in row.items()) +
                  f" (rank {times.index(min(times))} of {len(times)}) | all: " + " ".join(f"{t:.1f}" for t in times),
                  flush=True)
            del ws, xs, lt
        print(f"M={m} per layer: " + ", ".join(f"{key} {t:.1f} us" for key, t in totals.items()), flush=True)


if __name__ == "__main__":
    main()
