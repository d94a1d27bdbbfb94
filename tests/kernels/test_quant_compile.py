"""The packed-weight kernels, W8A8's (8-bit weights in the few-token kernel, the quantizing norm) and
decode over an 8-bit KV cache compile for a Hopper GPU (sm_90), even on a machine without one.

Triton's interpreter, which runs the kernels in CI, accepts code that its compiler rejects; this
compiles the kernels' default tiles ahead of time (frontend, LLVM, ptxas from Triton's wheel), in a
subprocess, since the interpreter is switched on for this whole test session.

It compiles with the Triton that torch brings here (3.9); the GPU image has 3.6, and a pass can fail
in one only (a 64-row tile of paired fp16 once did, in 3.6). To compile with the GPU's version:
`pip install --no-deps --target /tmp/t36 triton==3.6.0`, then
`env -u TRITON_INTERPRET PYTHONPATH=/tmp/t36:$PWD python tests/kernels/test_quant_compile.py`.
With `--sass` it also prints each kernel's registers, shared memory and main loop (instructions per
iteration of the longest backward branch, and the most frequent of them), from `cuobjdump`: the
counts that the results files quote, with no GPU.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

SM90_SHARED_MEMORY = 232448  # bytes a block may use on an H100 or H200 (227 KiB)
ALIGNED = ["x_ptr", "w_ptr", "s_ptr", "o_ptr", "out_ptr", "stride_xm", "stride_wn", "stride_sn", "stride_om", "K"]
BUILT: list[tuple[str, object]] = []  # (what, compiled kernel), for --sass


def compile_sm90(what: str, kernel, const: dict, types: dict, num_warps: int, num_stages: int | None = None,
                 aligned: list[str] = ()) -> None:
    """Compile `kernel` for sm_90 with constexprs `const` and argument types `types` (else i32); `aligned`
    arguments 16-divisible, as Triton specializes them at run time (pipelined loads depend on it)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = kernel.arg_names
    signature = {n: "constexpr" if n in const else types.get(n, "i32") for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned if n not in const}
    source = ASTSource(kernel, signature, {(names.index(k),): v for k, v in const.items()}, attrs)
    options = {"num_warps": num_warps} | ({} if num_stages is None else {"num_stages": num_stages})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    # A launch asking for more shared memory than an SM has fails only on the GPU (OutOfResources).
    assert compiled.metadata.shared <= SM90_SHARED_MEMORY, (what, compiled.metadata.shared)
    BUILT.append((what, compiled))


def compile_defaults() -> None:
    import torch

    from martlet.kernels import quant_linear as ql
    from martlet.layers.quantization.packed import PackedFormat

    fp16, fp32 = torch.float16, torch.float32
    gated, qkv, o = 3 * 4096, 12288, 4096  # output widths (N) of Llama-2-7B's projections, K = 4096
    int4, int8 = PackedFormat(4, 128, True), PackedFormat(8, 4096, False)
    cases = [(1, o, int4, False, fp16, 1), (1, gated, int8, True, fp16, 1), (3, gated, int8, True, fp16, 1),
             (16, gated, PackedFormat(4, 32, False), True, fp16, 1), (24, o, PackedFormat(8, 16, True), False, fp16, 1),
             (32, gated, PackedFormat(4, 64, True), True, fp32, 1),
             (1, o, int4, False, fp16, 2), (1, gated, int8, True, fp16, 2),
             (3, qkv, int8, False, fp16, 1),  # the tensor-core tile, scales in the epilogue
             (16, qkv, int4, False, fp16, 1), (16, gated, PackedFormat(8, 128, False), True, fp16, 1),  # a group a step
             (16, o, int4, False, fp16, 4)]  # tensor cores, K split
    for m, n, fmt, silu, x_dtype, split_k in cases:
        cfg = replace(ql.quant_linear_config(m, n, 4096, fmt, silu), split_k=split_k)
        kernel = ql._quant_gemv_kernel if cfg.block_m < 16 else ql._quant_linear_kernel
        const = dict(BITS=fmt.bits, GROUP=fmt.group_size, ASYMMETRIC=fmt.asymmetric,
                     SCALE_IN_LOOP=ql.scales_in_loop(fmt, 4096),
                     HAS_BIAS=False, SILU_AND_MUL=silu, EVEN=m % 2 == 0, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                     BLOCK_K=cfg.block_k, NUM_STAGES=cfg.num_stages, PDL=True, bias_ptr=None)
        if kernel is ql._quant_linear_kernel:
            const["GROUP_STEPS"], const["BLOCK_K"] = ql.tensor_core_steps(fmt, 4096, cfg.block_k)
            const["FP32"] = x_dtype == fp32
        else:  # aligned fp16 x: the paired-fp16 inline assembly, which the interpreter never runs
            const["X_PAIRS"] = True
        const["SPLIT_K"] = split_k
        if split_k == 1:
            const["partial_ptr"] = None
        if not fmt.asymmetric:
            const["o_ptr"] = None
        x_type = "*fp32" if x_dtype == fp32 else "*fp16"
        types = {"w_ptr": "*i32", "x_ptr": x_type, "s_ptr": x_type, "o_ptr": x_type, "out_ptr": x_type,
                 "partial_ptr": "*fp32"}
        what = (f"{kernel.fn.__name__} {m} token(s), N {n}, {fmt.bits}-bit g{fmt.group_size}"
                f"{' asym' if fmt.asymmetric else ''}{', gated' if silu else ''}, {x_type[1:]} x, "
                f"tile {cfg.block_m}x{cfg.block_n}x{const['BLOCK_K']}, split {split_k}")
        compile_sm90(what, kernel, const, types, cfg.num_warps, cfg.num_stages, ALIGNED)
    for fmt in (PackedFormat(4, 128, True), PackedFormat(8, 16, False)):  # the scratch weight for cuBLAS
        const = dict(BITS=fmt.bits, GROUP=fmt.group_size, ASYMMETRIC=fmt.asymmetric, BLOCK_N=32, BLOCK_W=32)
        if not fmt.asymmetric:
            const["o_ptr"] = None
        types = {"w_ptr": "*i32", "s_ptr": "*fp16", "o_ptr": "*fp16", "out_ptr": "*fp16"}
        compile_sm90(f"_dequantize_kernel {fmt.bits}-bit g{fmt.group_size}", ql._dequantize_kernel, const, types, 4)


def compile_w8a8() -> None:
    from martlet.kernels import linear, norm, quantize

    for x_type, w_type, silu, split_k in [("*fp16", "*fp8e4nv", False, 1), ("*fp16", "*fp8e4nv", True, 1),
                                          ("*fp16", "*i8", True, 1), ("*bf16", "*fp8e4nv", False, 1),
                                          ("*fp16", "*fp8e4nv", True, 4), ("*fp16", "*fp16", False, 2)]:
        const = dict(HAS_SCALE=w_type != x_type, HAS_BIAS=False, SILU_AND_MUL=silu, FP32=False, BLOCK_M=16,
                     BLOCK_N=32, BLOCK_K=256, NUM_STAGES=5, SPLIT_K=split_k, PDL=True, bias_ptr=None)
        if split_k == 1:
            const["partial_ptr"] = None
        types = {"x_ptr": x_type, "w_ptr": w_type, "scale_ptr": "*fp32", "out_ptr": x_type, "partial_ptr": "*fp32"}
        what = f"{x_type[1:]} x, {w_type[1:]} weights{', gated' if silu else ''}, split {split_k}"
        aligned = ["x_ptr", "w_ptr", "scale_ptr", "out_ptr", "partial_ptr", "K", "stride_xm", "stride_wn", "stride_om"]
        compile_sm90(f"_skinny_linear_kernel {what}", linear._skinny_linear_kernel, const, types, 2, aligned=aligned)
        if split_k > 1:
            const = dict(HAS_SCALE=w_type != x_type, HAS_BIAS=False, SILU_AND_MUL=silu, BLOCK_M=16, BLOCK_N=128,
                         SPLIT_K=split_k, PDL=True, bias_ptr=None)
            types = {"partial_ptr": "*fp32", "scale_ptr": "*fp32", "out_ptr": x_type}
            compile_sm90(f"_skinny_reduce_kernel {what}", linear._skinny_reduce_kernel, const, types, 4)
    types = {"sums_ptr": "*i32", "row_scales_ptr": "*fp32", "col_scales_ptr": "*fp32", "out_ptr": "*fp16"}
    compile_sm90("_scale_sums_kernel", quantize._scale_sums_kernel, dict(BLOCK=1024), types, 4)
    for code_type, max_code in (("*fp8e4nv", 448.0), ("*i8", 127.0)):
        const = dict(NUM_ROWS=1, N=4096, BLOCK_H=1, BLOCK_N=4096, HAS_RESIDUAL=True, MAX_CODE=max_code, PDL=True)
        types = {"x_ptr": "*fp16", "residual_ptr": "*fp16", "weight_ptr": "*fp16", "out_ptr": code_type,
                 "scales_ptr": "*fp32", "eps": "fp32"}
        compile_sm90(f"_rms_norm_kernel to {code_type[1:]}", norm._rms_norm_kernel, const, types, 8)


def compile_kv_cache_reads() -> None:
    """Decode over int8 and fp8 caches with fp16 and bf16 queries, in the engine's block size and tile for
    8-bit caches, one query head a KV head (Llama-2-7B): the int8 codes' inline-assembly widening runs only
    in compiled kernels, never in the interpreter."""
    import torch

    from martlet.config import default_block_size
    from martlet.kernels import decode

    cfg = decode.decode_config(128, torch.float16, torch.device("cuda"), quantized=True)
    for q_type in ("*fp16", "*bf16"):
        for code_type, kv_cache_dtype in (("*i8", "int8"), ("*fp8e4nv", "fp8")):
            const = dict(GROUP=1, HEAD_DIM=128, BLOCK_SIZE=default_block_size(kv_cache_dtype), BLOCK_G=16,
                         BLOCK_N=cfg.block_n, BLOCK_D=128, PRECISION="tf32", SPLIT=True, QUANT=True, PDL=True,
                         stride_v_slot=1)
            types = {"q_ptr": q_type, "k_cache_ptr": code_type, "v_cache_ptr": code_type, "k_scale_ptr": "*fp16",
                     "v_scale_ptr": "*fp16", "out_ptr": "*fp32", "lse_ptr": "*fp32", "seq_lens_ptr": "*i32",
                     "block_tables_ptr": "*i32", "qk_scale": "fp32"}
            # Pointers and strides are 16-divisible at run time, but for those Triton leaves unspecialized.
            kernel = decode._decode_kernel
            aligned = [n for n in kernel.arg_names if n not in kernel.do_not_specialize and n != "qk_scale"]
            compile_sm90(f"_decode_kernel {q_type[1:]} q over {kv_cache_dtype}", kernel, const, types, cfg.num_warps,
                         cfg.num_stages, aligned)


def print_sass() -> None:
    """Per built kernel: registers, shared memory, and its main loop from `cuobjdump -sass`."""
    import tempfile

    import triton

    cuobjdump = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    print(f"Triton {triton.__version__}, sm_90")
    for what, compiled in BUILT:
        with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
            cubin.write(compiled.asm["cubin"])
            cubin.flush()
            usage = subprocess.run([cuobjdump, "-res-usage", cubin.name], capture_output=True, text=True).stdout
            sass = subprocess.run([cuobjdump, "-sass", cubin.name], capture_output=True, text=True).stdout
        registers = re.search(r"REG:(\d+)", usage).group(1)
        loop = main_loop(sass)
        mix = ", ".join(f"{op} {n}" for op, n in collections.Counter(loop).most_common(6))
        print(f"{what}: {registers} registers, {compiled.metadata.shared} B shared; loop {len(loop)}: {mix}")


def main_loop(sass: str) -> list[str]:
    """The opcodes between the longest backward branch and its target (empty without a loop)."""
    code = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    loops = [(int(target.group(1), 16), address) for address, text in code
             if (target := re.search(r"\bBRA\s+0x([0-9a-f]+)", text)) and int(target.group(1), 16) < address]
    if not loops:
        return []
    start, end = max(loops, key=lambda loop: loop[1] - loop[0])
    return [re.sub(r"^@!?U?P\w+\s+", "", text).split()[0] for address, text in code if start <= address <= end]


def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    if result.returncode and "ptxas" in result.stderr and "not found" in result.stderr:
        pytest.skip("Triton's wheel has no ptxas here")
    assert result.returncode == 0, result.stderr[-3000:]


if __name__ == "__main__":
    compile_defaults()
    compile_w8a8()
    compile_kv_cache_reads()
    if "--sass" in sys.argv:
        print_sass()
