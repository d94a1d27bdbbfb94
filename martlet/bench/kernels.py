"""Kernel benchmarks against the GPU's own ceilings.

    python -m martlet.bench.kernels [--json FILE] [--quick] [--tune]

Measured in one run, on CUDA:
- ceilings: device-to-device copy bandwidth (bytes read + written) and bf16 GEMM TFLOP/s (8192^3);
- memory-bound kernels (RMSNorm, fused add + RMSNorm, SiLU * up, rotary + KV write): GB/s, vs copy;
- prefill attention: TFLOP/s (causal: 2 * 2 * S^2 * D * Hq / 2 per sequence) vs PyTorch SDPA's flash
  backend on the same batch of equal-length sequences;
- decode attention: GB/s (K and V bytes read as stored, plus q and out) vs copy, batch 1..256 x context
  128..32k, over a bf16, an int8 and an fp8 cache;
- the few-token matmul: GB/s of weight read vs copy and vs cuBLAS (`F.linear`), Llama-2-7B's
  projections at 1, 4 and 16 tokens.
`--tune` first times candidate tile configs and decode split targets on a few shapes, then runs the
tables with the best of each (and times what paging costs); the kernels' defaults come from it.
`--only SECTION` runs the ceilings and that one section.

Times are `triton.testing.do_bench` medians after its warm-up. do_bench flushes the L2 before
every timed call, so each call reads its inputs from DRAM, as a model's next layer would.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import traceback
from collections.abc import Callable

import torch
import torch.nn.functional as F

from martlet.bench.roofline import measure_ceilings
from martlet.config import KV_CACHE_DTYPES, default_block_size
from martlet.layers.kv_cache import LayerKV, allocate_kv_cache, kv_format, quantize, tile_bytes

GIB = 1 << 30


def bench_ms(fn: Callable[[], object]) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def log(msg: str) -> None:
    print(msg, flush=True)


# ---- ceilings ------------------------------------------------------------------------------------


def read_bandwidth() -> float:
    """GB/s of summing 2 GiB: a read-only stream, which is what decode attention is."""
    src = torch.randn(GIB // 2, device="cuda")
    return src.numel() * 4 / bench_ms(lambda: src.sum()) / 1e6


# ---- memory-bound kernels ------------------------------------------------------------------------


def elementwise(tokens: int) -> list[dict]:
    from martlet.kernels.activation import silu_and_mul
    from martlet.kernels.norm import rms_norm
    from martlet.kernels.rotary_kv import rotary_kv_write
    from martlet.layers.activation import silu_and_mul as silu_ref
    from martlet.layers.norm import rms_norm as rms_ref
    from martlet.layers.rotary import RotaryEmbedding

    bf16, hidden, inter = torch.bfloat16, 4096, 14336
    x, residual = (torch.randn(tokens, hidden, device="cuda", dtype=bf16) for _ in range(2))
    weight = torch.randn(hidden, device="cuda", dtype=bf16)
    gate_up = torch.randn(tokens, 2 * inter, device="cuda", dtype=bf16)
    row = 2 * hidden * tokens  # bytes of one [tokens, hidden] bf16 tensor

    # Llama-3-8B attention shapes for the rotary + cache write: q, k, v in, q out, k, v to the cache.
    hq, hkv, d, bs = 32, 8, 128, 16
    qkv = torch.randn(tokens, (hq + 2 * hkv) * d, device="cuda", dtype=bf16)
    q, k, v = (t.view(tokens, -1, d) for t in qkv.split([hq * d, hkv * d, hkv * d], dim=-1))
    rotary = RotaryEmbedding(d, 8192, 500000.0, None).to("cuda")
    positions = torch.randint(0, 8192, (tokens,), device="cuda")
    _, (kv,) = allocate_kv_cache(1, tokens // bs + 1, hkv, bs, d, bf16, None, torch.device("cuda"))
    slots = torch.randperm(tokens, device="cuda")

    cases = [
        ("rms_norm", 2 * row, lambda: rms_norm(x, weight, 1e-6), lambda: rms_ref(x, weight, 1e-6)),
        # The residual grows by x per call (in place): fine for timing.
        ("add + rms_norm", 4 * row, lambda: rms_norm(x, weight, 1e-6, residual),
         lambda: rms_ref(x + residual, weight, 1e-6)),
        ("silu_and_mul", 3 * 2 * inter * tokens, lambda: silu_and_mul(gate_up), lambda: silu_ref(gate_up)),
        ("rotary + kv write", 2 * 2 * (hq + 2 * hkv) * d * tokens,
         lambda: rotary_kv_write(q, k, v, positions, rotary.cos_sin_cache, kv, slots), None),
    ]
    rows = []
    for name, nbytes, fn, ref in cases:
        ms = bench_ms(fn)
        ref_ms = bench_ms(ref) if ref else None
        rows.append({"kernel": name, "tokens": tokens, "bytes": nbytes, "ms": ms, "GB/s": nbytes / ms / 1e6,
                     "torch_ms": ref_ms})
        log(f"  {name:18s} {ms * 1e3:8.1f} us  {nbytes / ms / 1e6:7.0f} GB/s"
            + (f"  (torch eager {ref_ms * 1e3:.1f} us)" if ref_ms else ""))
    return rows


# ---- attention inputs ----------------------------------------------------------------------------


def paged_cache(batch: int, seq_len: int, hkv: int, d: int, block_size: int, dtype: torch.dtype,
                kv_cache_dtype: str = "auto") -> tuple[LayerKV, torch.Tensor]:
    """A random K/V pool in the engine's layout with room for `batch` sequences of `seq_len`, and its
    blocks in shuffled order."""
    num_blocks = batch * -(-seq_len // block_size)
    fmt = kv_format(kv_cache_dtype)
    _, (kv,) = allocate_kv_cache(1, num_blocks, hkv, block_size, d, dtype, fmt, torch.device("cuda"))
    for codes, scales in ((kv.k, kv.k_scale), (kv.v, kv.v_scale)):
        for start in range(0, num_blocks, 4096):  # a slice at a time: quantizing works in fp32
            rows = torch.randn(codes[start : start + 4096].shape, device="cuda", dtype=dtype)
            if fmt is None:
                codes[start : start + 4096] = rows
            else:
                codes[start : start + 4096], scales[start : start + 4096] = quantize(rows, fmt)
    return kv, torch.randperm(num_blocks, device="cuda", dtype=torch.int32)


def cache_bytes(kv: LayerKV, tokens: int) -> int:
    """Bytes of K and V (codes and scales) of `tokens` tokens of every KV head."""
    return 2 * tokens * kv.k.shape[1] * tile_bytes(1, kv.k.shape[-1], kv.k.dtype, kv.format)


def block_tables_for(blocks: torch.Tensor, batch: int, seq_len: int, block_size: int) -> torch.Tensor:
    per_seq = -(-seq_len // block_size)
    return blocks[: batch * per_seq].view(batch, per_seq)


# ---- prefill -------------------------------------------------------------------------------------


def prefill_case(seq_len: int, batch: int, hq: int, hkv: int, configs: list = (None,), block_size: int = 16,
                 d: int = 128) -> list[dict]:
    """TFLOP/s of our kernel (per config; None is the default) and of SDPA flash, `batch` causal prompts."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from martlet.kernels.prefill import prefill_attention

    bf16, tokens = torch.bfloat16, batch * seq_len
    flops = batch * 2 * 2 * seq_len * seq_len * d * hq / 2
    q = torch.randn(tokens, hq, d, device="cuda", dtype=bf16)
    kv, blocks = paged_cache(batch, seq_len, hkv, d, block_size, bf16)
    tables = block_tables_for(blocks, batch, seq_len, block_size)
    qsl = torch.arange(0, tokens + 1, seq_len, device="cuda", dtype=torch.int32)
    seq_lens = torch.full((batch,), seq_len, device="cuda", dtype=torch.int32)

    qs = q.view(batch, seq_len, hq, d).transpose(1, 2)
    ks, vs = (torch.randn(batch, hkv, seq_len, d, device="cuda", dtype=bf16) for _ in range(2))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        try:
            sdpa_ms = bench_ms(lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True,
                                                                      enable_gqa=hq != hkv))
        except RuntimeError:  # flash without native GQA: hand it repeated K/V (same FLOPs)
            ke, ve = (t.repeat_interleave(hq // hkv, dim=1) for t in (ks, vs))
            sdpa_ms = bench_ms(lambda: F.scaled_dot_product_attention(qs, ke, ve, is_causal=True))
    rows = []
    for cfg in configs:
        row = {"seq_len": seq_len, "batch": batch, "hq": hq, "hkv": hkv, "head_dim": d, "block_size": block_size,
               "config": cfg and vars(cfg), "sdpa_ms": sdpa_ms, "sdpa_tflops": flops / sdpa_ms / 1e9}
        try:
            ms = bench_ms(lambda cfg=cfg: prefill_attention(q, kv, qsl, seq_lens, tables, seq_len, d**-0.5,
                                                            config=cfg))
            row.update(ms=ms, **{"TFLOP/s": flops / ms / 1e9}, vs_sdpa=sdpa_ms / ms)
        except Exception as e:  # a config the GPU cannot run (e.g. out of shared memory)
            row.update(error=repr(e)[:300])
        rows.append(row)
    return rows


def prefill(seq_lens: list[int], total_tokens: int, cfg) -> list[dict]:
    rows = []
    for hq, hkv in [(32, 32), (32, 8)]:
        for seq_len in seq_lens:
            (row,) = prefill_case(seq_len, max(1, total_tokens // seq_len), hq, hkv, configs=[cfg])
            rows.append(row)
            log(f"  S={seq_len:6d} B={row['batch']:3d} Hq/Hkv={hq}/{hkv}: {row['TFLOP/s']:6.1f} TFLOP/s, "
                f"SDPA flash {row['sdpa_tflops']:6.1f} ({row['vs_sdpa']:.2f}x)")
    return rows


# ---- decode --------------------------------------------------------------------------------------


def decode_case(batch: int, ctx: int, pool, configs: list = (None,), splits: list[int] | None = None,
                hq: int = 32, dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """GB/s of decode_attention over `batch` contexts of `ctx` tokens, per config x split count, with
    queries in the model's `dtype` (it decides how an 8-bit cache's codes are widened)."""
    from martlet.kernels.decode import decode_attention, decode_num_splits

    kv, blocks = pool
    hkv, block_size, d = kv.k.shape[1:]
    tables = block_tables_for(blocks, batch, ctx, block_size)
    q = torch.randn(batch, hq, d, device="cuda", dtype=dtype)
    seq_lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
    nbytes = cache_bytes(kv, batch * ctx) + 2 * q.numel() * q.element_size()
    rows = []
    for cfg in configs:
        for num_splits in splits or [decode_num_splits(batch, hkv, ctx, q.device)]:
            row = {"batch": batch, "context": ctx, "hq": hq, "hkv": hkv, "head_dim": d, "num_splits": num_splits,
                   "kv_cache_dtype": kv.format.name if kv.format else "bf16", "config": cfg and vars(cfg),
                   "bytes": nbytes}
            try:
                ms = bench_ms(lambda cfg=cfg, s=num_splits: decode_attention(
                    q, kv, seq_lens, tables, d**-0.5, s, config=cfg))
                row.update(ms=ms, **{"GB/s": nbytes / ms / 1e6})
            except Exception as e:
                row.update(error=repr(e)[:300])
            rows.append(row)
    return rows


def decode(batches: list[int], contexts: list[int], copy_gbs: float, cfg, programs_per_sm: int) -> list[dict]:
    """Each KV cache format (bf16, int8, fp8), its bytes counted as stored (codes and scales)."""
    from martlet.kernels.decode import decode_num_splits

    rows = []
    for kv_cache_dtype in KV_CACHE_DTYPES:  # in the engine's block size for the format
        pool = paged_cache(max(batches), max(contexts), 8, 128, default_block_size(kv_cache_dtype), torch.bfloat16,
                           kv_cache_dtype)
        for batch in batches:
            for ctx in contexts:
                splits = decode_num_splits(batch, 8, ctx, torch.device("cuda"), programs_per_sm)
                (row,) = decode_case(batch, ctx, pool, configs=[cfg], splits=[splits])
                rows.append(row)
                where = f"  {row['kv_cache_dtype']:4s} B={batch:3d} ctx={ctx:6d} splits={row['num_splits']:2d}: "
                if "error" in row:  # e.g. a kernel that does not compile: say so, keep timing the rest
                    log(where + row["error"])
                    continue
                row["vs_copy"] = row["GB/s"] / copy_gbs
                log(where + f"{row['ms'] * 1e3:8.1f} us {row['GB/s']:7.0f} GB/s ({row['vs_copy']:.0%} of copy)")
        del pool
    return rows


# ---- few-token matmul ---------------------------------------------------------------------------

# Llama-2-7B's projections, (N, K): QKV, O, gate|up, down, LM head.
LINEAR_SHAPES = [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008), (32000, 4096)]


def skinny_linear_case(tokens: int, n: int, k: int, copy_gbs: float) -> dict:
    """GB/s (weight bytes) of skinny_linear with the tile `skinny_config` picks, and of cuBLAS on the same product."""
    from martlet.kernels.linear import skinny_config, skinny_linear

    fp16 = torch.float16
    weight = torch.randn(n, k, device="cuda", dtype=fp16) / k**0.5
    x = torch.randn(tokens, k, device="cuda", dtype=fp16)
    nbytes = weight.numel() * weight.element_size()
    cublas_ms = bench_ms(lambda: F.linear(x, weight))
    ms = bench_ms(lambda: skinny_linear(x, weight))
    return {"tokens": tokens, "n": n, "k": k, "config": vars(skinny_config(n, fp16, x.device)), "bytes": nbytes,
            "cublas_ms": cublas_ms, "ms": ms, "vs_copy": nbytes / ms / 1e6 / copy_gbs, "vs_cublas": cublas_ms / ms,
            "GB/s": nbytes / ms / 1e6}


def skinny_linears(copy_gbs: float) -> list[dict]:
    """Each shape with its own tile (`skinny_config`). Its tiles were tuned inside a CUDA graph, as the
    engine runs them (benchmarks/gemm_graph.py): timed alone, launch and cold start weigh more."""
    rows = []
    for tokens in (1, 4, 16, 32):
        for n, k in LINEAR_SHAPES:
            row = skinny_linear_case(tokens, n, k, copy_gbs)
            rows.append(row)
            log(f"  M={tokens:2d} N={n:5d} K={k:5d}: {row['ms'] * 1e3:6.1f} us "
                f"{row['GB/s']:5.0f} GB/s ({row['vs_copy']:.0%} of copy), cuBLAS {row['cublas_ms'] * 1e3:6.1f} us "
                f"({row['vs_cublas']:.2f}x)")
    return rows


# ---- tuning --------------------------------------------------------------------------------------


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def best(rows: list[dict], candidates: list, metric: str):
    """The candidate with the highest geometric mean of `metric` over the shapes it was timed on."""
    def score(cfg) -> float:
        mine = [r for r in rows if r["config"] == vars(cfg)]
        return 0.0 if not mine or any("error" in r for r in mine) else geomean([r[metric] for r in mine])

    return max(candidates, key=score)


def tune_prefill() -> dict:
    from martlet.kernels.prefill import PrefillConfig

    out = {"prefill": []}
    candidates = [PrefillConfig(*c) for c in [(128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2), (128, 128, 8, 3),
                                              (128, 32, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3)]]
    for seq_len, hkv in [(1024, 32), (4096, 32), (4096, 8), (16384, 32)]:
        rows = prefill_case(seq_len, max(1, 16384 // seq_len), 32, hkv, configs=candidates)
        out["prefill"] += rows
        for r in rows:
            log(f"  prefill S={seq_len} Hkv={hkv} {r['config']}: " + (
                r["error"] if "error" in r else f"{r['TFLOP/s']:.1f} TFLOP/s ({r['vs_sdpa']:.2f}x SDPA)"))
    out["prefill_config"] = best(out["prefill"], candidates, "TFLOP/s")
    log(f"  -> prefill {out['prefill_config']}")
    return out


def tune_decode() -> dict:
    """Tile configs, then split targets (programs per SM) with the best config."""
    from martlet.kernels.decode import DecodeConfig, decode_num_splits

    out = {"decode": [], "splits": []}
    pool = paged_cache(256, 8192, 8, 128, 16, torch.bfloat16)
    shapes = [(1, 32768), (4, 16384), (16, 4096), (64, 1024), (256, 256), (256, 2048)]
    candidates = [DecodeConfig(*c) for c in [(64, 4, 3), (64, 4, 2), (32, 4, 3), (128, 4, 2), (128, 8, 3),
                                             (64, 8, 3), (32, 2, 4), (16, 2, 4)]]
    for batch, ctx in shapes:
        rows = decode_case(batch, ctx, pool, configs=candidates)
        out["decode"] += rows
        for r in rows:
            log(f"  decode B={batch} ctx={ctx} splits={r['num_splits']} {r['config']}: "
                + (r["error"] if "error" in r else f"{r['GB/s']:.0f} GB/s"))
    cfg = out["decode_config"] = best(out["decode"], candidates, "GB/s")
    log(f"  -> decode {cfg}")
    scores = {}
    for programs_per_sm in (2, 4, 8, 16):
        rows = [row for batch, ctx in shapes for row in decode_case(
            batch, ctx, pool, configs=[cfg], splits=[decode_num_splits(batch, 8, ctx, torch.device("cuda"),
                                                                       programs_per_sm)])]
        for r in rows:
            r["programs_per_sm"] = programs_per_sm
            log(f"  decode B={r['batch']} ctx={r['context']} {programs_per_sm} programs/SM -> "
                f"{r['num_splits']} splits: {r['GB/s']:.0f} GB/s")
        out["splits"] += rows
        scores[programs_per_sm] = geomean([r["GB/s"] for r in rows])
    out["programs_per_sm"] = max(scores, key=scores.get)
    log(f"  -> {out['programs_per_sm']} programs per SM")
    return out


def diagnose(prefill_cfg, decode_cfg, programs_per_sm: int) -> dict:
    """What paging costs: the same work with long pages (prefill) or pages in order (decode)."""
    from martlet.kernels.decode import decode_num_splits

    out = {"prefill": [], "decode": []}
    for block_size in (16, 256):
        (r,) = prefill_case(4096, 4, 32, 32, configs=[prefill_cfg], block_size=block_size)
        out["prefill"].append(r)
        log(f"  prefill S=4096 block_size={block_size}: {r['TFLOP/s']:.1f} TFLOP/s")
    kv, blocks = pool = paged_cache(256, 2048, 8, 128, 16, torch.bfloat16)
    in_order = (kv, torch.arange(blocks.numel(), device="cuda", dtype=torch.int32))
    for batch, ctx in [(4, 16384), (256, 256), (256, 2048)]:
        splits = [decode_num_splits(batch, 8, ctx, torch.device("cuda"), programs_per_sm)]
        for name, p in [("shuffled", pool), ("in order", in_order)]:
            (r,) = decode_case(batch, ctx, p, configs=[decode_cfg], splits=splits)
            r["pages"] = name
            out["decode"].append(r)
            log(f"  decode B={batch} ctx={ctx} pages {name}: {r['GB/s']:.0f} GB/s")
    return out


# ---- report --------------------------------------------------------------------------------------


def markdown_rows(header: str, rows: list[dict], row: Callable[[dict], str]) -> list[str]:
    """A blank line, `header` and its rule, then row(r) per entry (an entry that failed: its error);
    nothing when there are no rows."""
    if not rows:
        return []
    return ["", header, "|" + "---|" * (header.count("|") - 1),
            *(f"| {r['error']} |" if "error" in r else row(r) for r in rows)]


def table(results: dict) -> str:
    c = results["ceilings"]

    def elementwise_row(r: dict) -> str:
        torch_us = f"{r['torch_ms'] * 1e3:.1f}" if r["torch_ms"] else "-"
        return (f"| {r['kernel']} | {r['tokens']} | {r['ms'] * 1e3:.1f} | {r['GB/s']:.0f} | "
                f"{r['GB/s'] / c['copy_GB/s']:.0%} | {torch_us} |")

    return "\n".join([
        f"GPU: {results['gpu']} ({results['sms']} SMs), torch {results['torch']}, triton {results['triton']}",
        f"Ceilings: copy {c['copy_GB/s']:.0f} GB/s (read + write), read-only (sum) {c['read_GB/s']:.0f} GB/s, "
        f"bf16 GEMM 8192^3 {c['gemm_TFLOP/s']:.0f} TFLOP/s",
        f"Configs: prefill {results['prefill_config'] or 'default'}, decode {results['decode_config'] or 'default'}, "
        f"{results['programs_per_sm']} decode programs per SM, few-token matmul per shape",
        *markdown_rows("| memory-bound kernel (bf16) | tokens | us | GB/s | % of copy | torch eager us |",
                       results.get("elementwise", []), elementwise_row),
        *markdown_rows(
            "| prefill (bf16, hd 128, causal) | batch | Hq/Hkv | ms | TFLOP/s | SDPA flash TFLOP/s | vs SDPA |",
            results.get("prefill", []),
            lambda r: f"| S={r['seq_len']} | {r['batch']} | {r['hq']}/{r['hkv']} | {r['ms']:.3f} | "
                      f"{r['TFLOP/s']:.1f} | {r['sdpa_tflops']:.1f} | {r['vs_sdpa']:.2f}x |"),
        *markdown_rows(
            "| decode (bf16 q, Hq/Hkv 32/8, hd 128, block 16) | KV cache | context | splits | us | GB/s | % of copy |",
            results.get("decode", []),
            lambda r: f"| batch {r['batch']} | {r.get('kv_cache_dtype', 'bf16')} | {r['context']} | "
                      f"{r['num_splits']} | {r['ms'] * 1e3:.1f} | {r['GB/s']:.0f} | {r['vs_copy']:.0%} |"),
        *markdown_rows(
            "| few-token matmul (fp16) | N x K | us | GB/s | % of copy | cuBLAS us | vs cuBLAS |",
            results.get("skinny_linear", []),
            lambda r: f"| {r['tokens']} tokens | {r['n']} x {r['k']} | {r['ms'] * 1e3:.1f} | {r['GB/s']:.0f} | "
                      f"{r['vs_copy']:.0%} | {r['cublas_ms'] * 1e3:.1f} | {r['vs_cublas']:.2f}x |"),
    ])


SECTIONS = ("elementwise", "prefill", "decode", "skinny_linear")


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", help="write all numbers to this file (after every section)")
    parser.add_argument("--quick", action="store_true", help="fewer, smaller shapes")
    parser.add_argument("--tune", action="store_true",
                        help="first time candidate tile configs and split targets, then use the best of each")
    parser.add_argument("--only", choices=SECTIONS, help="run the ceilings and this section alone")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cli_args(parser)
    run(parser.parse_args())


def run(args: argparse.Namespace) -> None:
    if not torch.cuda.is_available():
        sys.exit("martlet.bench.kernels needs a CUDA GPU")
    import triton

    from martlet.kernels.decode import PROGRAMS_PER_SM

    props = torch.cuda.get_device_properties(0)
    results = {"gpu": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
               "triton": triton.__version__, "prefill_config": None, "decode_config": None,
               "programs_per_sm": PROGRAMS_PER_SM}

    def section(key: str, title: str, fn: Callable[[], object]) -> None:
        """Run one part; a failure is printed and the rest still runs. Save everything so far."""
        log(title)
        try:
            results[key] = fn()
        except Exception:
            traceback.print_exc()
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1, default=vars)

    def tuned(key: str, title: str, tuner: Callable[[], dict], *settings: str) -> None:
        """With --tune, run `tuner` and take its picks of `settings` for the section's table."""
        if args.tune:
            section(key, title, tuner)
            results.update({name: results[key][name] for name in settings if key in results})

    def ceilings() -> dict:
        measured = measure_ceilings(torch.device("cuda"), torch.bfloat16)  # the ones bench latency uses too
        return {"copy_GB/s": measured.copy_gb_s, "read_GB/s": read_bandwidth(), "gemm_TFLOP/s": measured.gemm_tflops}

    section("ceilings", f"{props.name}: ceilings", ceilings)
    c = results["ceilings"]
    log(f"  copy {c['copy_GB/s']:.0f} GB/s, read {c['read_GB/s']:.0f} GB/s, GEMM {c['gemm_TFLOP/s']:.0f} TFLOP/s")
    wanted = [args.only] if args.only else SECTIONS
    if "elementwise" in wanted:
        section("elementwise", "memory-bound kernels", lambda: elementwise(4096 if args.quick else 16384))
    if "prefill" in wanted:
        tuned("tuning_prefill", "tuning prefill", tune_prefill, "prefill_config")
        seq_lens = [512, 1024, 4096] if args.quick else [512, 1024, 2048, 4096, 8192, 16384]
        section("prefill", "prefill attention", lambda: prefill(seq_lens, 16384, results["prefill_config"]))
    if "decode" in wanted:
        tuned("tuning_decode", "tuning decode", tune_decode, "decode_config", "programs_per_sm")
        batches = [1, 16, 256] if args.quick else [1, 4, 16, 64, 256]
        contexts = [128, 2048, 32768] if args.quick else [128, 512, 2048, 8192, 32768]
        section("decode", "decode attention", lambda: decode(
            batches, contexts, c["copy_GB/s"], results["decode_config"], results["programs_per_sm"]))
    if "skinny_linear" in wanted:
        section("skinny_linear", "few-token matmul (fp16)", lambda: skinny_linears(c["copy_GB/s"]))
    if args.tune and {"prefill", "decode"} <= set(wanted):
        section("diagnostics", "diagnostics", lambda: diagnose(
            results["prefill_config"], results["decode_config"], results["programs_per_sm"]))
    print()
    print(table(results))


if __name__ == "__main__":
    main()
