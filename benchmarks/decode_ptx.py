"""Compile the decode kernel for sm_90 on any machine (no GPU needed) and count what its PTX does, per
KV cache format: how the K/V tiles are loaded (cp.async, ldmatrix, ld.shared), how many conversion
and integer instructions the 8-bit formats add, and how many K/V tiles the pipeliner keeps in flight.

    env -u TRITON_INTERPRET PYTHONPATH=$PWD python benchmarks/decode_ptx.py [--query-dtype fp16|bf16] \
        [--config BLOCK_N WARPS STAGES] [--out DIR]

Pointers and the cache strides are declared 16-aligned, as the engine's are at run time (Triton
specializes them so); without that, no load is vectorized and the picture is wrong.
"""

from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from martlet.kernels import decode

FORMATS = {"16-bit": None, "int8": "*i8", "fp8": "*fp8e4nv"}  # None: the query's own dtype
ALIGNED = ["q_ptr", "k_cache_ptr", "v_cache_ptr", "k_scale_ptr", "v_scale_ptr", "out_ptr", "lse_ptr", "stride_qt",
           "stride_qh", "stride_os", "stride_block", "stride_head", "stride_slot", "stride_v_slot", "stride_v_d",
           "stride_scale_block", "stride_scale_head"]


def compile_decode(query_type: str, kv_type: str | None, group: int = 1, block_n: int = 32, num_warps: int = 2,
                   num_stages: int = 4):
    """Llama-2-7B's decode shape (head dim 128, block 16), split-K; kv_type None: an unquantized cache."""
    kernel, names = decode._decode_kernel, decode._decode_kernel.arg_names
    quant = kv_type is not None
    kv_type = kv_type or query_type
    const = dict(GROUP=group, HEAD_DIM=128, BLOCK_SIZE=16, BLOCK_G=max(16, group), BLOCK_N=block_n, BLOCK_D=128,
                 PRECISION="tf32", SPLIT=True, QUANT=quant, PDL=True)
    types = {"q_ptr": query_type, "k_cache_ptr": kv_type, "v_cache_ptr": kv_type, "out_ptr": "*fp32",
             "lse_ptr": "*fp32", "seq_lens_ptr": "*i32", "block_tables_ptr": "*i32", "qk_scale": "fp32",
             "k_scale_ptr": "*fp16" if quant else kv_type, "v_scale_ptr": "*fp16" if quant else kv_type}
    # V's slots are contiguous in an 8-bit cache (channel-major tiles), its channels in a 16-bit one;
    # Triton specializes a stride of 1 to a constant, as it does at run time.
    const.update({"stride_v_slot": 1} if quant else {"stride_v_d": 1})
    signature = {n: "constexpr" if n in const else types.get(n, "i32") for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in ALIGNED
             if (quant or "scale" not in n) and n not in const}
    source = ASTSource(kernel, signature, {(names.index(n),): v for n, v in const.items()}, attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--query-dtype", default="fp16", choices=["fp16", "bf16"],
                        help="the model's dtype: it decides how 8-bit codes are widened")
    parser.add_argument("--out", default=None, help="also write each format's TTGIR and PTX here")
    parser.add_argument("--config", type=int, nargs=3, default=(32, 2, 4), metavar=("BLOCK_N", "WARPS", "STAGES"),
                        help="the tile to compile (default: the 16-bit cache's)")
    args = parser.parse_args()
    block_n, num_warps, num_stages = args.config
    counts = {}
    for name, kv_type in FORMATS.items():
        compiled = compile_decode("*" + args.query_dtype, kv_type, block_n=block_n, num_warps=num_warps,
                                  num_stages=num_stages)
        # Shared-memory buffers the pipeliner made for the K and V tiles: their count is how many tiles
        # are in flight ahead of the one being computed (num_stages - 3 here, at least 1).
        buffers = re.findall(r"local_alloc : \(\) -> !ttg.memdesc<(\d+)x\d+x\d+x", compiled.asm["ttgir"])
        print(f"{name}: K/V tile buffers {buffers}, {compiled.metadata.shared} bytes of shared memory")
        ptx = compiled.asm["ptx"]
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            for ext in ("ttgir", "ptx"):
                Path(args.out, f"decode_{name}.{ext}").write_text(compiled.asm[ext])
        # An instruction's name, after an optional predicate and the brace of an inline-asm block.
        starts = re.finditer(r"^\s*(?:@!?%p\d+\s+)?\{?\s*([a-z][a-z0-9]*)[.\s]", ptx, re.M)
        counts[name] = collections.Counter(m.group(1) for m in starts)
    ops = sorted(set().union(*counts.values()), key=lambda op: -max(c[op] for c in counts.values()))
    print(f"{'instruction':12s}" + "".join(f"{name:>8s}" for name in FORMATS))
    for op in ops[:24]:
        print(f"{op:12s}" + "".join(f"{counts[name][op]:8d}" for name in FORMATS))


if __name__ == "__main__":
    main()
