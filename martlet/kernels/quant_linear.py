"""Matmuls by weights in the packed layout (`martlet.layers.quantization.packed`): y = x @ W.T.

A decode step at small batch is a pass over the weights, so 4-bit weights should make it up to 4x
faster than fp16 ones, if nothing but the packed words cross the memory bus and unpacking them
costs fewer instructions than the bus allows. Each program owns BLOCK_N output rows and streams
their contiguous words along K, unpacking in registers. Groups hold a multiple of `pack` inputs,
so all codes of a word share their group's scale and offset.

- Up to GEMV_MAX_TOKENS tokens, `_quant_gemv_kernel` (CUDA-core FMAs: at one to four tokens a
  tensor-core tile would be mostly padding). For fp16 x it unpacks and multiplies two codes per
  instruction in paired fp16 (`_half2_codes`, `_half2_dot`: about two instructions a code, which
  took int4 from 1.5 to 2 TB/s on an H200); otherwise it takes code j of a word to a float by
  placing it under the exponent bits of 2^23 and subtracting 2^23 (a shift, an OR and an add:
  int-to-float conversions run at a quarter of the FMA rate). x's inputs load as whole words' runs;
  a word's sum over its codes (two words' for 8-bit codes in paired fp16), sum_j code_j x_j, is
  scaled once, + offset * sum_j x_j for the offset. K may be split over programs (`split_k`), for
  more programs on a narrow weight; `linear.reduce_partial_sums` adds the slices' fp32 sums.
- Up to MAX_TOKENS, `_quant_linear_kernel` (tensor cores, one row tile of 16 or 32): a tile's words
  are unpacked into input order (`_in_input_order`: a word's codes laid side by side), so x's columns
  load contiguous and one dot takes the tile. On an H200 it beat fp16 for 8-bit codes per channel
  (1.23x on the 7B qkv at 16 tokens). Over groups of 64 inputs or more, a step is one group: the codes
  enter the dot unscaled and the step's sums are scaled per row (`_dequant_dot`), since codes scaled
  in the step went through shared memory on their way to the MMA. With K split over programs, 4-bit
  weights in groups of 128 at 8 to 32 tokens then ran at 0.52-1.67x the speed of fp16 through cuBLAS,
  per Llama-2-7B projection on an H200, where dequantize + cuBLAS ran at 0.27-0.43x; they take the
  kernel up to `kernel_max_tokens`.
- Beyond, `dequantize` writes the weight in the model's dtype to a scratch tensor for cuBLAS. At 64
  and 256 tokens that beat a GEMM dequantizing inside (this kernel with one M tile of all the tokens)
  for int4 on every Llama-2-7B projection, and for int8 over the four together (results/quant-weight-only-*).

All are CUDA-graph safe: no host syncs, and the outputs and scratch tensor are allocated the same
way at every call.

Reference: `martlet.layers.quantization.packed.dequantize` followed by `torch.nn.functional.linear`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from martlet.kernels.linear import (
    _dot,
    _epilogue,
    partial_sums,
    reduce_partial_sums,
    split_k_range,
    store_partial_sums,
)
from martlet.kernels.pdl import pdl_launch, wait_for_previous_kernel
from martlet.kernels.quantize import INTERPRETED

if TYPE_CHECKING:  # packed.py calls these kernels: the format is only named here
    from martlet.layers.quantization.packed import PackedFormat

# Untuned first guesses (no GPU at hand when written), except MAX_TOKENS: quant_linear_bench.py measures them.
GEMV_MAX_TOKENS = 4  # the FMA kernel up to here
MAX_TOKENS = 32  # the tensor-core kernel's single row tile of 16 or 32 up to here; dequantize + cuBLAS beyond
SILU_AND_MUL_MAX_TOKENS = 16
# The tensor-core kernel takes a group per step from groups this long (`_dequant_dot`'s GROUP_STEPS): shorter
# ones would make steps too short (GGUF's groups of 16 and 32 keep their codes scaled in the step).
GROUP_STEPS_MIN_GROUP = 64


def kernel_max_tokens(fmt: PackedFormat, silu_and_mul: bool = False) -> int:
    """Tokens up to which `quant_linear` is the faster path; dequantize + cuBLAS beyond. 4-bit codes take
    the tensor-core kernel only where it steps a group at a time (groups of 64 or more): there, with K
    split, it beat dequantize + cuBLAS on every Llama-2-7B projection on an H200, 1.6-4.0x at 8, 16
    and 32 tokens (results/quant-weight-only-*, session 11), and gated, with SiLU * up applied on its
    accumulators, at 32 tokens too (71.8 us against 78.5 for gate_up alone). Other formats apply SiLU * up
    inside the kernel up to SILU_AND_MUL_MAX_TOKENS only."""
    if fmt.bits == 4 and fmt.group_size >= GROUP_STEPS_MIN_GROUP:
        return MAX_TOKENS
    if fmt.bits == 8:
        return SILU_AND_MUL_MAX_TOKENS if silu_and_mul else MAX_TOKENS
    return GEMV_MAX_TOKENS


@dataclass(frozen=True)
class QuantLinearConfig:
    block_m: int  # below 16 (tl.dot's minimum) selects the FMA kernel
    block_n: int
    # Inputs per step. The tensor-core kernel wants a multiple of 16 * pack and, over groups of 64 inputs
    # or more, caps it at one group (`tensor_core_steps`).
    block_k: int
    num_warps: int
    num_stages: int
    # K cut into this many slices, each its own program, and their fp32 sums added by a second kernel
    # (more programs in flight for a narrow weight); the tensor-core kernel splits only a single row tile.
    split_k: int = 1


def quant_linear_config(m: int, n: int, k: int, fmt: PackedFormat, silu_and_mul: bool = False) -> QuantLinearConfig:
    """The tile for m tokens and an [n, k] weight (n rows of gate and up together when gated).

    From sweeps on an H200 over the Llama-2-7B projections (quant_linear_bench.py --sweep;
    results/quant-weight-only-*, sessions 6 and 9), µs per layer in brackets:
    - one token, 8-bit codes: 512 bytes a row in 8-row tiles, 2 warps, 4 stages where N is 4096 or
      less (o, down); a wide weight wants shorter rows: 256 bytes in 16-row tiles (qkv 13.5 against
      16.0), or 128 bytes in 8-row tiles when gated (gate_up 23.1 against 26.3);
    - one token, 4-bit: 256 bytes a row, 3 stages, 4 warps; 16 rows when N is 4096 or less or gated
      (a program reads as many gate rows as up rows), else 32; a long K in 8-row tiles, split in 4
      over a narrow N (down) for the programs it lacks (15.4 against 18.2 unsplit);
    - two to four tokens: 128 bytes a row for 4-bit codes, 256 for 8-bit, whose narrow weights are
      split in 2 when K is long (down 18.3 against 32.5) and whose wide ungated qkv takes the tensor-core
      tile (18.8 against 21.1);
    - 5 to 32 tokens, 4-bit in groups of 128 (session 11): 64-row tiles; at 16 tokens K split in 4 (qkv
      32.2, o 12.8, down 26.1 against 35.7, 25.0, 63.5 unsplit), in 2 when gated (39.2 against 52.6);
      at 32, in 4 (o 20.6, down 43.9, gated 71.8 against 38.3, 101.9, 74.2), but in 2 for qkv (44.0;
      57.9 unsplit, 48.6 in 4).
    The tensor-core kernel reads 128 bytes a row, which leaves each code position of a tile 16 to 32
    inputs. Larger tiles spill registers (compiled for sm_90)."""
    per_byte = 8 // fmt.bits
    narrow, long_k = n <= 4096, k > 4096
    if m == 1 and fmt.bits == 8:
        if narrow:
            return QuantLinearConfig(1, 8, 512, 2, 4)
        return QuantLinearConfig(1, 8, 128, 2, 4) if silu_and_mul else QuantLinearConfig(1, 16, 256, 2, 4)
    if m == 1:
        if long_k:
            return QuantLinearConfig(1, 32, 256 * per_byte, 4, 3, split_k=4) if narrow else \
                QuantLinearConfig(1, 8, 256 * per_byte, 4, 3)
        return QuantLinearConfig(1, 16 if narrow or silu_and_mul else 32, 256 * per_byte, 4, 3)
    if m <= GEMV_MAX_TOKENS:
        block_m = triton.next_power_of_2(m)
        if fmt.bits == 4:
            return QuantLinearConfig(block_m, 16 if narrow or silu_and_mul else 32, 128 * per_byte, 4, 3)
        if narrow:
            return QuantLinearConfig(block_m, 32, 256, 4, 3, split_k=2) if long_k else \
                QuantLinearConfig(block_m, 16, 256, 4, 4)
        if not silu_and_mul:
            return QuantLinearConfig(16, 32, 256, 4, 3)
        return QuantLinearConfig(block_m, 16, 128, 4, 3)
    if fmt.bits == 4:  # a group a step; K split for more programs
        if m <= 16:
            return QuantLinearConfig(16, 64, 128 * per_byte, 4, 3, split_k=2 if silu_and_mul else 4)
        return QuantLinearConfig(32, 64, 128 * per_byte, 4, 3, split_k=4 if narrow or silu_and_mul else 2)
    if m <= 16:
        return QuantLinearConfig(16, 32, 128 * per_byte, 4, 3)
    return QuantLinearConfig(32, 64, 128 * per_byte, 8, 3)


@triton.jit
def _load(ptr, mask, EVEN: tl.constexpr):
    """A load masked only where the tile can run past the tensor."""
    if EVEN:
        return tl.load(ptr)
    return tl.load(ptr, mask=mask, other=0)


@triton.jit
def _code(words, j: tl.constexpr, BITS: tl.constexpr, centre: tl.constexpr):
    """Code j of each word (lowest bits first) less `centre`, as fp32, exactly, in two instructions and
    no (quarter-rate) int-to-float conversion: masked in place under the exponent bits of 2^23 (one
    AND-OR), a code at bit s is the float 2^23 + code * 2^s, and one FMA scales it by 2^-s and subtracts
    2^(23-s) + centre (exact: small integers). Codes past bit 16 of a word, which would reach the
    exponent, are shifted down 16 bits first (one shift a word)."""
    HIGH: tl.constexpr = (j + 1) * BITS > 23
    s: tl.constexpr = j * BITS - 16 if HIGH else j * BITS
    if HIGH:
        words = words >> 16
    if INTERPRETED:
        bits = (words & (((1 << BITS) - 1) << s)) | 0x4B000000
    else:  # one LOP3 with both constants in registers (ptxas gives an AND and an OR their own)
        bits = tl.inline_asm_elementwise(
            asm="lop3.b32 $0, $1, $2, $3, 0xEA;", constraints="=r,r,r,r",
            args=[words, tl.full(words.shape, ((1 << BITS) - 1) << s, tl.int32),
                  tl.full(words.shape, 0x4B000000, tl.int32)], dtype=tl.int32, is_pure=True, pack=1)
    return bits.to(tl.float32, bitcast=True) * (1.0 / (1 << s)) - ((8388608 >> s) + centre)


@triton.jit
def _by_code(x, BITS: tl.constexpr, A: tl.constexpr, B: tl.constexpr, C: tl.constexpr):
    """x [A, B, C, pack], a word's inputs on the last axis -> pack tensors [A, B, C], the inputs of code
    0, 1, ...: the axis split in halves, which costs nothing when it lies in one thread (a load of whole
    words' inputs puts it there)."""
    if BITS == 4:  # input j = 4 h + 2 q + e at [.., h, q, e]
        even, odd = tl.split(tl.reshape(x, (A, B, C, 2, 2, 2)))
        e0, e2 = tl.split(even)
        o0, o2 = tl.split(odd)
        x0, x4 = tl.split(e0)
        x2, x6 = tl.split(e2)
        x1, x5 = tl.split(o0)
        x3, x7 = tl.split(o2)
        return x0, x1, x2, x3, x4, x5, x6, x7
    else:
        even, odd = tl.split(tl.reshape(x, (A, B, C, 2, 2)))  # input j = 2 h + e
        x0, x2 = tl.split(even)
        x1, x3 = tl.split(odd)
        return x0, x1, x2, x3


@triton.jit
def _half2(value: tl.constexpr):
    """A 32-bit register holding `value` twice as fp16 (an operand of the f16x2 instructions)."""
    bits = tl.full((1,), value, tl.float32).to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return bits | (bits << 16)


@triton.jit
def _interleave(a, b):
    """Registers of fp16 pairs (x_i, x_i+1) from a and (x_j, x_j+1) from b -> (x_i, x_j), (x_i+1, x_j+1)."""
    return tl.inline_asm_elementwise(
        asm="""{
        prmt.b32 $0, $2, $3, 0x5410;
        prmt.b32 $1, $2, $3, 0x7632;
        }""",
        constraints="=r,=r,r,r", args=[a, b], dtype=(tl.int32, tl.int32), is_pure=True, pack=1)


@triton.jit
def _half2_codes(words, BITS: tl.constexpr, ASYMMETRIC: tl.constexpr):
    """Words -> their codes as (c - centre) / D, exact, in fp16 pairs: codes (j, j + pack/2) of a word in
    one int32 each, j = 0 .. pack/2 - 1. D = 2^(bits-1) symmetric (centre D), 2^bits asymmetric
    (centre 0), so every value lies in [-1, 1].

    Codes j and j + pack/2 sit in the two 16-bit halves of a word at the same bits. Masked out (LOP3)
    and placed under the fp16 exponent bits of 1024 (0x6400), a pair is the two fp16s 1024 + c (or
    1024 + 16 c for the upper nibble of a byte), and one paired FMA scales and shifts both exactly.
    (vLLM's Marlin and FasterTransformer unpack int4 this way for tensor cores.)"""
    D: tl.constexpr = (1 << BITS) if ASYMMETRIC else (1 << (BITS - 1))
    CENTRE: tl.constexpr = 0 if ASYMMETRIC else D
    scale, shift = _half2(1.0 / D), _half2(-(1024 + CENTRE) / D)  # 1024 + c -> (c - centre) / D
    if BITS == 4:
        high_scale, high_shift = _half2(1.0 / (16 * D)), _half2(-(64 + CENTRE) / D)  # 1024 + 16 c
        return tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 q;
            lop3.b32 $0, $4, 0x000F000F, 0x64006400, 0xEA;
            fma.rn.f16x2 $0, $0, $5, $6;
            lop3.b32 $1, $4, 0x00F000F0, 0x64006400, 0xEA;
            fma.rn.f16x2 $1, $1, $7, $8;
            shr.u32 q, $4, 8;
            lop3.b32 $2, q, 0x000F000F, 0x64006400, 0xEA;
            fma.rn.f16x2 $2, $2, $5, $6;
            lop3.b32 $3, q, 0x00F000F0, 0x64006400, 0xEA;
            fma.rn.f16x2 $3, $3, $7, $8;
            }""",
            constraints="=r,=r,=r,=r,r,r,r,r,r", args=[words, scale, shift, high_scale, high_shift],
            dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)
    else:
        return tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 q;
            lop3.b32 $0, $2, 0x00FF00FF, 0x64006400, 0xEA;
            fma.rn.f16x2 $0, $0, $3, $4;
            shr.u32 q, $2, 8;
            lop3.b32 $1, q, 0x00FF00FF, 0x64006400, 0xEA;
            fma.rn.f16x2 $1, $1, $3, $4;
            }""",
            constraints="=r,=r,r,r,r", args=[words, scale, shift], dtype=(tl.int32, tl.int32), is_pure=True, pack=1)


@triton.jit
def _word_pairs(t):
    """t [.., W] -> its even and odd words [.., W / 2] (in one thread: a thread holds runs of words)."""
    return tl.split(tl.reshape(t, (t.shape[0], t.shape[1], t.shape[2], t.shape[3] // 2, 2)))


@triton.jit
def _half2_dot(codes, x, BITS: tl.constexpr):
    """Sums over pairs of codes[i] * x[i] (four or two fp16-pair registers a word), in fp32, of each
    4-bit word, or of each two neighbouring 8-bit words ([.., W / 2]): four products sum in fp16 within
    a half (codes in [-1, 1], so no partial sum passes 4 max|x|), the halves in fp32. (Two 4-bit words
    a sum, eight products a half, took 20% fewer instructions but made int4 b1 8/256 16% slower in the
    engine on an H200: results/quant-weight-only-*.)"""
    acc = 0  # fp16 pairs (+0, +0)
    for i in tl.static_range(16 // BITS):
        if BITS == 8:
            code_0, code_1 = _word_pairs(codes[i])
            x_0, x_1 = _word_pairs(x[i])
            acc = _half2_fma(code_1, x_1, _half2_fma(code_0, x_0, acc))
        else:
            acc = _half2_fma(codes[i], x[i], acc)
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .b16 lo, hi;
        .reg .f32 flo, fhi;
        mov.b32 {lo, hi}, $1;
        cvt.f32.f16 flo, lo;
        cvt.f32.f16 fhi, hi;
        add.f32 $0, flo, fhi;
        }""",
        constraints="=r,r", args=[acc], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _half2_fma(a, b, c):
    """a * b + c on fp16 pairs (int32 registers)."""
    return tl.inline_asm_elementwise(asm="fma.rn.f16x2 $0, $1, $2, $3;", constraints="=r,r,r,r", args=[a, b, c],
                                     dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _half2_x(x_ptr, offs_m, mask_m, word_cols, mask_words, stride_xm, BITS: tl.constexpr):
    """x's inputs of the tile's words as fp16 pairs in `_half2_codes`' order: inputs (j, j + pack/2),
    [BLOCK_M, 1, GROUPS, GROUP_WORDS] int32 each. Loaded as pairs (2i, 2i + 1), whole words' runs,
    and interleaved (PRMT) once per thread: the rows of the tile share them."""
    pair_ptrs = x_ptr.to(tl.pointer_type(tl.int32)) + offs_m[:, None, None, None] * (stride_xm // 2)
    word_mask = mask_m[:, None, None, None] & mask_words[None, :, :, None]
    if BITS == 4:  # pairs (0, 1), (4, 5) and (2, 3), (6, 7) of each word
        pair = tl.arange(0, 2)[:, None] * 2 + tl.arange(0, 2)[None, :]  # [half, e] -> pair 2 half + e
        cols = word_cols[:, :, None, None] * 4 + pair[None, None]
        x_pairs = tl.load(pair_ptrs[:, :, :, :, None] + cols[None], mask=word_mask[:, :, :, :, None], other=0)
        pairs_04, pairs_26 = tl.split(x_pairs)
        x01, x45 = tl.split(pairs_04)
        x23, x67 = tl.split(pairs_26)
        x04, x15 = _interleave(x01, x45)
        x26, x37 = _interleave(x23, x67)
        return x04[:, None], x15[:, None], x26[:, None], x37[:, None]
    else:  # pairs (0, 1), (2, 3) of each word
        cols = word_cols[:, :, None] * 2 + tl.arange(0, 2)[None, None, :]
        x01, x23 = tl.split(tl.load(pair_ptrs + cols[None], mask=word_mask, other=0))
        x02, x13 = _interleave(x01, x23)
        return x02[:, None], x13[:, None]


@triton.jit
def _load_x(x_ptr, offs_m, mask_m, word_cols, mask_words, stride_xm, PACK: tl.constexpr):
    """x's inputs of the tile's words, [BLOCK_M, GROUPS, GROUP_WORDS, pack] fp32, a word's inputs in one thread."""
    cols = word_cols[:, :, None] * PACK + tl.arange(0, PACK)[None, None, :]
    x_mask = mask_m[:, None, None, None] & mask_words[None, :, :, None]
    return tl.load(x_ptr + offs_m[:, None, None, None] * stride_xm + cols[None], mask=x_mask, other=0.0).to(tl.float32)


@triton.jit
def _gemv_step(
    acc, x_ptr, w_ptr, scales, offsets, offs_m, mask_m, rows, mask_rows, k0, K, stride_xm, stride_wn,
    BITS: tl.constexpr, ASYMMETRIC: tl.constexpr, SCALE_IN_LOOP: tl.constexpr,
    EVEN: tl.constexpr, HALF2: tl.constexpr, GROUPS: tl.constexpr, GROUP_WORDS: tl.constexpr,
):
    """acc [BLOCK_M, BLOCK_N, GROUPS, sums] += one tile's x @ W[rows]^T, kept apart by word (by two 8-bit
    words in paired fp16) until the end.

    The tile's words are [BLOCK_N, GROUPS, GROUP_WORDS]: GROUPS runs of words that share a scale, so a
    scale is loaded once a run and spread over its words in registers. A word's products sum in its
    thread: in paired fp16 (`_half2_codes`, `_half2_dot`) for fp16 x, else in fp32, codes on a last
    axis [.., pack] beside x's inputs [BLOCK_M, GROUPS, GROUP_WORDS, pack], loaded as whole words' runs
    (16 bytes for int4). (Loading x a code position at a time, at stride pack, kept the L1 busy with one 2-byte
    load per code: results/quant-weight-only-*.)"""
    PACK: tl.constexpr = 32 // BITS
    run = tl.arange(0, GROUPS)[:, None] * GROUP_WORDS + tl.arange(0, GROUP_WORDS)[None, :]  # [GROUPS, GROUP_WORDS]
    word_cols = k0 // PACK + run
    mask_words = word_cols < K // PACK
    w_mask = mask_rows[:, None, None] & mask_words[None, :, :]
    words = _load(w_ptr + rows[:, None, None] * stride_wn + word_cols[None, :, :], w_mask, EVEN)
    if HALF2:  # each word unpacked once for all tokens
        codes = _half2_codes(words[None], BITS, ASYMMETRIC)
        dot = _half2_dot(codes, _half2_x(x_ptr, offs_m, mask_m, word_cols, mask_words, stride_xm, BITS), BITS)
        unit: tl.constexpr = (1 << BITS) if ASYMMETRIC else (1 << (BITS - 1))  # its codes' divisor D
    else:
        x_by_code = _by_code(_load_x(x_ptr, offs_m, mask_m, word_cols, mask_words, stride_xm, PACK), BITS,
                             acc.shape[0], GROUPS, GROUP_WORDS)
        middle: tl.constexpr = 0 if ASYMMETRIC else 1 << (BITS - 1)  # symmetric codes centre in the same subtraction
        dot = tl.zeros(acc.shape, dtype=tl.float32)
        for j in tl.static_range(PACK):
            dot += _code(words, j, BITS, middle)[None] * x_by_code[j][:, None]
        unit: tl.constexpr = 1
    if not SCALE_IN_LOOP:  # one scale per output channel: applied in the epilogue
        return acc + dot * unit
    acc += dot * (scales.to(tl.float32) * unit)[None, :, :, None]
    if ASYMMETRIC:
        x_sums = tl.sum(_load_x(x_ptr, offs_m, mask_m, word_cols, mask_words, stride_xm, PACK), axis=3)
        if acc.shape[3] < GROUP_WORDS:  # per sum of several words, as `dot`
            words_per_sum: tl.constexpr = GROUP_WORDS // acc.shape[3]
            x_sums = tl.sum(tl.reshape(x_sums, (x_sums.shape[0], GROUPS, acc.shape[3], words_per_sum)), axis=3)
        acc += offsets.to(tl.float32)[None, :, :, None] * x_sums[:, None]
    return acc


@triton.jit
def _group_params(s_ptr, o_ptr, rows, mask_rows, k0, K, stride_sn, GROUP: tl.constexpr, ASYMMETRIC: tl.constexpr,
                  GROUPS: tl.constexpr, RUN: tl.constexpr):
    """The scales and offsets (the scales again when symmetric) of the step at input k0, [BLOCK_N, GROUPS];
    zeros past K. The kernel loads them a step ahead: 2-byte loads are too small for the asynchronous
    copies that pipeline the words, so loaded in the step that uses them they stalled it for a
    round trip to memory (decode over an 8-bit cache gained up to 46% from the same change)."""
    group = (k0 + tl.arange(0, GROUPS) * RUN) // GROUP
    s_mask = mask_rows[:, None] & (group < tl.cdiv(K, GROUP))[None, :]
    s_offs = rows[:, None] * stride_sn + group[None, :]
    scales = tl.load(s_ptr + s_offs, mask=s_mask, other=0.0)
    offsets = scales
    if ASYMMETRIC:
        offsets = tl.load(o_ptr + s_offs, mask=s_mask, other=0.0)
    return scales, offsets


@triton.jit
def _quant_gemv_kernel(
    x_ptr, w_ptr, s_ptr, o_ptr, bias_ptr, out_ptr, partial_ptr, M, N, K, stride_xm, stride_wn, stride_sn, stride_om,
    BITS: tl.constexpr, GROUP: tl.constexpr, ASYMMETRIC: tl.constexpr, SCALE_IN_LOOP: tl.constexpr,
    HAS_BIAS: tl.constexpr, SILU_AND_MUL: tl.constexpr, EVEN: tl.constexpr, X_PAIRS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
    SPLIT_K: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_previous_kernel(PDL)
    PACK: tl.constexpr = 32 // BITS
    # A step's inputs in runs that share a scale: whole groups, or the whole step within one group.
    RUN: tl.constexpr = GROUP if SCALE_IN_LOOP and GROUP < BLOCK_K else BLOCK_K
    GROUPS: tl.constexpr = BLOCK_K // RUN
    GROUP_WORDS: tl.constexpr = RUN // PACK
    offs_m = tl.arange(0, BLOCK_M)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, rows < N
    # Paired fp16 (`_half2_dot`) for fp16 x that loads as 32-bit pairs (X_PAIRS: aligned), compiled (the
    # interpreter runs no PTX), in runs of whole sums (two 8-bit words a sum).
    WORDS_PER_SUM: tl.constexpr = BITS // 4
    HALF2: tl.constexpr = (X_PAIRS and x_ptr.dtype.element_ty == tl.float16 and GROUP_WORDS % WORDS_PER_SUM == 0
                           and not INTERPRETED)
    SUMS: tl.constexpr = GROUP_WORDS // WORDS_PER_SUM if HALF2 else GROUP_WORDS
    acc = tl.zeros((BLOCK_M, BLOCK_N, GROUPS, SUMS), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N, GROUPS, SUMS), dtype=tl.float32)
    k_start, k_end = split_k_range(K, BLOCK_K, SPLIT_K)
    # The first step's group scales and offsets (W is [gate; up] when gated: output column n's up row is N + n);
    # one scale per output channel (not SCALE_IN_LOOP) waits for the epilogue, and these stay unused.
    scales, offsets = _group_params(s_ptr, o_ptr, rows, mask_n & SCALE_IN_LOOP, k_start, K, stride_sn, GROUP,
                                    ASYMMETRIC, GROUPS, RUN)
    up_scales, up_offsets = _group_params(s_ptr, o_ptr, N + rows, mask_n & SCALE_IN_LOOP & SILU_AND_MUL, k_start, K,
                                          stride_sn, GROUP, ASYMMETRIC, GROUPS, RUN)
    for k0 in tl.range(k_start, k_end, BLOCK_K, num_stages=NUM_STAGES):
        step_scales, step_offsets, step_up_scales, step_up_offsets = scales, offsets, up_scales, up_offsets
        if SCALE_IN_LOOP:  # the next step's, a step ahead
            scales, offsets = _group_params(s_ptr, o_ptr, rows, mask_n, k0 + BLOCK_K, K, stride_sn, GROUP,
                                            ASYMMETRIC, GROUPS, RUN)
            if SILU_AND_MUL:
                up_scales, up_offsets = _group_params(s_ptr, o_ptr, N + rows, mask_n, k0 + BLOCK_K, K, stride_sn,
                                                      GROUP, ASYMMETRIC, GROUPS, RUN)
        acc = _gemv_step(acc, x_ptr, w_ptr, step_scales, step_offsets, offs_m, mask_m, rows, mask_n, k0, K,
                         stride_xm, stride_wn, BITS, ASYMMETRIC, SCALE_IN_LOOP, EVEN, HALF2, GROUPS, GROUP_WORDS)
        if SILU_AND_MUL:
            acc_up = _gemv_step(acc_up, x_ptr, w_ptr, step_up_scales, step_up_offsets, offs_m, mask_m, N + rows,
                                mask_n, k0, K, stride_xm, stride_wn, BITS, ASYMMETRIC, SCALE_IN_LOOP, EVEN, HALF2,
                                GROUPS, GROUP_WORDS)
    acc, acc_up = tl.sum(tl.sum(acc, axis=3), axis=2), tl.sum(tl.sum(acc_up, axis=3), axis=2)
    if SPLIT_K == 1:
        # One scale per output channel (not SCALE_IN_LOOP): scales [N, 1], so a channel's is at its index.
        _epilogue(acc, acc_up, s_ptr, bias_ptr, out_ptr, offs_m, rows, mask_m, mask_n, N, stride_om,
                  not SCALE_IN_LOOP, HAS_BIAS, SILU_AND_MUL)
    else:
        store_partial_sums(partial_ptr, acc, acc_up, offs_m, rows, mask_n, N, SILU_AND_MUL)


@triton.jit
def _unpack(words, BITS: tl.constexpr, centre: tl.constexpr):
    """Words [R, W] -> their codes less `centre`, fp32 [R, W * pack] in input order (code j of word w is
    input w * pack + j)."""
    if BITS == 4:
        codes = _in_input_order((_code(words, 0, BITS, centre), _code(words, 1, BITS, centre),
                                 _code(words, 2, BITS, centre), _code(words, 3, BITS, centre),
                                 _code(words, 4, BITS, centre), _code(words, 5, BITS, centre),
                                 _code(words, 6, BITS, centre), _code(words, 7, BITS, centre)))
    else:
        codes = _in_input_order((_code(words, 0, BITS, centre), _code(words, 1, BITS, centre),
                                 _code(words, 2, BITS, centre), _code(words, 3, BITS, centre)))
    return codes


@triton.jit
def _in_input_order(codes):
    """Each word's codes 0 .. pack-1, a tuple of [R, W] -> [R, W * pack] in input order. Joined pairwise,
    a word's codes stay in its thread, side by side. Each join adds a last axis of 2, and the flattening
    reads the first-added axis slowest: so code 0 pairs with code pack/2, then 2 with 6, and so on."""
    if len(codes) == 8:
        c0, c1, c2, c3, c4, c5, c6, c7 = codes
        joined = tl.join(tl.join(tl.join(c0, c4), tl.join(c2, c6)), tl.join(tl.join(c1, c5), tl.join(c3, c7)))
    else:
        c0, c1, c2, c3 = codes
        joined = tl.join(tl.join(c0, c2), tl.join(c1, c3))
    return tl.reshape(joined, (c0.shape[0], c0.shape[1] * len(codes)))


@triton.jit
def _per_code(values, BITS: tl.constexpr):
    """A value per word [R, W] -> the same for each of its codes [R, W * pack], laid out as `_unpack`'s
    codes are (a group holds whole words, so its scale and offset are per word)."""
    pair = tl.join(values, values)
    codes = tl.join(tl.join(pair, pair), tl.join(pair, pair)) if BITS == 4 else tl.join(pair, pair)
    return tl.reshape(codes, (values.shape[0], values.shape[1] * (32 // BITS)))


@triton.jit
def _dequantize_words(
    words, s_ptr, o_ptr, rows, word_cols, w_mask, stride_sn, BITS: tl.constexpr, GROUP: tl.constexpr,
    ASYMMETRIC: tl.constexpr, SCALE_IN_LOOP: tl.constexpr, EVEN: tl.constexpr, DTYPE: tl.constexpr,
):
    """A words tile [R, W] (rows `rows`, word columns `word_cols`) as weights [R, W * pack] in DTYPE, in
    input order; unscaled when the scale waits for the epilogue. Computed in fp32 from fp32 scale and
    offset and rounded once, as the reference does. A group holds whole words, so its scale and
    offset are read once a word and spread over its codes. (An asymmetric format always scales in the
    loop.)"""
    w = _unpack(words, BITS, 0 if ASYMMETRIC else 1 << (BITS - 1))  # unscaled, exact
    scale, offset = _word_params(s_ptr, o_ptr, rows, word_cols, w_mask, stride_sn, BITS, GROUP, ASYMMETRIC,
                                 SCALE_IN_LOOP, EVEN)
    if SCALE_IN_LOOP:
        w *= _per_code(scale, BITS)
    if ASYMMETRIC:
        w += _per_code(offset, BITS)
    return w.to(DTYPE)


@triton.jit
def _word_params(s_ptr, o_ptr, rows, word_cols, w_mask, stride_sn, BITS: tl.constexpr, GROUP: tl.constexpr,
                 ASYMMETRIC: tl.constexpr, SCALE_IN_LOOP: tl.constexpr, EVEN: tl.constexpr):
    """The scale and offset of each word of a tile [R, W] (its group's), in fp32; zeros where the format
    has none in the loop."""
    s_offs = rows[:, None] * stride_sn + (word_cols * (32 // BITS) // GROUP)[None, :]
    scale = tl.zeros(w_mask.shape, tl.float32)
    offset = tl.zeros(w_mask.shape, tl.float32)
    if SCALE_IN_LOOP:
        scale = _load(s_ptr + s_offs, w_mask, EVEN).to(tl.float32)
    if ASYMMETRIC:
        offset = _load(o_ptr + s_offs, w_mask, EVEN).to(tl.float32)
    return scale, offset


@triton.jit
def _dequant_dot(
    acc, x_ptr, w_ptr, s_ptr, o_ptr, offs_m, mask_m, rows, mask_rows, k0, K, stride_xm, stride_wn, stride_sn,
    BITS: tl.constexpr, GROUP: tl.constexpr, ASYMMETRIC: tl.constexpr, SCALE_IN_LOOP: tl.constexpr,
    GROUP_STEPS: tl.constexpr, FP32: tl.constexpr, EVEN: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """acc += x[:, the step's inputs] @ W[rows, the step's inputs]^T, W unpacked to input order, so x's
    columns load contiguous and one dot takes the step.

    With GROUP_STEPS a step lies within one group: its codes (less the centre: small integers, exact in
    any float) enter the dot unscaled, and the step's sums are scaled per row, plus the row's offset
    times the sum of x's inputs. The words then reach the MMA without a trip through shared memory:
    scaled per code, they took one (64 two-byte stores a thread a step, int4 in groups of 128, sm_90
    SASS from Triton 3.6). Otherwise the codes are dequantized in fp32 (`_dequantize_words`)."""
    PACK: tl.constexpr = 32 // BITS
    word_cols = k0 // PACK + tl.arange(0, BLOCK_K // PACK)
    w_mask = mask_rows[:, None] & (word_cols < K // PACK)[None, :]
    words = _load(w_ptr + rows[:, None] * stride_wn + word_cols[None, :], w_mask, EVEN)
    cols = k0 + tl.arange(0, BLOCK_K)
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + cols[None, :], mask=mask_m[:, None] & (cols < K)[None, :],
                other=0.0)
    if not GROUP_STEPS:
        w = _dequantize_words(words, s_ptr, o_ptr, rows, word_cols, w_mask, stride_sn, BITS, GROUP, ASYMMETRIC,
                              SCALE_IN_LOOP, EVEN, x_ptr.dtype.element_ty)
        return acc + _dot(x, w, FP32)
    centre: tl.constexpr = 0 if ASYMMETRIC else 1 << (BITS - 1)
    if BITS == 4:
        # Byte b of a word holds inputs 2b (low nibble) and 2b + 1 (high): even and odd inputs take a dot each,
        # each unpacked as 8-bit codes are, four to a word (the layout that needs no shared memory).
        x_even, x_odd = tl.split(tl.reshape(x, (x.shape[0], BLOCK_K // 2, 2)))
        low = _in_input_order((_code(words, 0, 4, centre), _code(words, 2, 4, centre), _code(words, 4, 4, centre),
                               _code(words, 6, 4, centre)))
        high = _in_input_order((_code(words, 1, 4, centre), _code(words, 3, 4, centre), _code(words, 5, 4, centre),
                                _code(words, 7, 4, centre)))
        sums = _dot(x_even, low.to(x.dtype), FP32) + _dot(x_odd, high.to(x.dtype), FP32)
    else:
        sums = _dot(x, _unpack(words, BITS, centre).to(x.dtype), FP32)
    s_offs = rows * stride_sn + k0 // GROUP
    acc += sums * tl.load(s_ptr + s_offs, mask=mask_rows, other=0.0).to(tl.float32)[None, :]
    if ASYMMETRIC:
        offset = tl.load(o_ptr + s_offs, mask=mask_rows, other=0.0).to(tl.float32)
        acc += tl.sum(x.to(tl.float32), 1)[:, None] * offset[None, :]
    return acc


@triton.jit
def _quant_linear_kernel(
    x_ptr, w_ptr, s_ptr, o_ptr, bias_ptr, out_ptr, partial_ptr, M, N, K, stride_xm, stride_wn, stride_sn, stride_om,
    BITS: tl.constexpr, GROUP: tl.constexpr, ASYMMETRIC: tl.constexpr, SCALE_IN_LOOP: tl.constexpr,
    GROUP_STEPS: tl.constexpr, HAS_BIAS: tl.constexpr, SILU_AND_MUL: tl.constexpr, FP32: tl.constexpr,
    EVEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    NUM_STAGES: tl.constexpr, SPLIT_K: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_previous_kernel(PDL)
    # Program axis 1 is the row tile, or with SPLIT_K the K slice of the one row tile.
    offs_m = (tl.program_id(1) if SPLIT_K == 1 else 0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, rows < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start, k_end = split_k_range(K, BLOCK_K, SPLIT_K)
    for k0 in tl.range(k_start, k_end, BLOCK_K, num_stages=NUM_STAGES):
        acc = _dequant_dot(acc, x_ptr, w_ptr, s_ptr, o_ptr, offs_m, mask_m, rows, mask_n, k0, K, stride_xm, stride_wn,
                           stride_sn, BITS, GROUP, ASYMMETRIC, SCALE_IN_LOOP, GROUP_STEPS, FP32, EVEN, BLOCK_K)
        if SILU_AND_MUL:  # W is [gate; up]: the up row of output column n is row N + n
            acc_up = _dequant_dot(acc_up, x_ptr, w_ptr, s_ptr, o_ptr, offs_m, mask_m, N + rows, mask_n, k0, K,
                                  stride_xm, stride_wn, stride_sn, BITS, GROUP, ASYMMETRIC, SCALE_IN_LOOP, GROUP_STEPS,
                                  FP32, EVEN, BLOCK_K)
    if SPLIT_K == 1:
        _epilogue(acc, acc_up, s_ptr, bias_ptr, out_ptr, offs_m, rows, mask_m, mask_n, N, stride_om,
                  not SCALE_IN_LOOP, HAS_BIAS, SILU_AND_MUL)
    else:
        store_partial_sums(partial_ptr, acc, acc_up, offs_m, rows, mask_n, N, SILU_AND_MUL)


def _check(qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None, fmt: PackedFormat) -> int:
    """The weight's K, after checking the tensors agree with the format."""
    n, words = qweight.shape
    k = words * fmt.pack
    if qweight.dtype != torch.int32 or not qweight.is_contiguous():
        raise ValueError("qweight must be contiguous int32 words")
    if fmt.group_size % fmt.pack or k % fmt.group_size:
        raise ValueError(f"group size {fmt.group_size} must divide K {k} and be a multiple of {fmt.pack}")
    if fmt.group_size < k and fmt.group_size & (fmt.group_size - 1):
        raise ValueError(f"group size {fmt.group_size} must be a power of two (or the whole row, {k}): a tile "
                         "holds whole groups or lies in one")
    if scales.shape != (n, k // fmt.group_size) or not scales.is_contiguous():
        raise ValueError(f"scales {tuple(scales.shape)} do not fit a [{n}, {k}] weight in groups of {fmt.group_size}")
    if fmt.asymmetric != (offsets is not None) or (offsets is not None and offsets.shape != scales.shape):
        raise ValueError("offsets must come with (and only with) an asymmetric format, shaped like scales")
    return k


def scales_in_loop(fmt: PackedFormat, k: int) -> bool:
    """Whether a K-long weight's scales (and offsets) vary along K, so the kernels apply them as they
    go; else one scale per output channel waits for the epilogue."""
    return fmt.asymmetric or fmt.group_size < k


def tensor_core_steps(fmt: PackedFormat, k: int, block_k: int) -> tuple[bool, int]:
    """Whether the tensor-core kernel takes a group a step (`_dequant_dot`'s GROUP_STEPS), and its inputs
    per step: the tile's, within one group when it does."""
    group_steps = scales_in_loop(fmt, k) and fmt.group_size >= GROUP_STEPS_MIN_GROUP
    return group_steps, min(block_k, fmt.group_size) if group_steps else block_k


def _pairs_aligned(x: torch.Tensor) -> bool:
    """Whether x's rows load as 32-bit pairs: a 4-byte-aligned start and an even row stride."""
    return x.data_ptr() % 4 == 0 and x.stride(0) % 2 == 0


def quant_linear(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None,
    fmt: PackedFormat, bias: torch.Tensor | None = None, config: QuantLinearConfig | None = None,
    silu_and_mul: bool = False,
) -> torch.Tensor:
    """x [M, K], rows contiguous; the packed weight [N, K] -> [M, N]. M <= MAX_TOKENS, unless `config`
    is a tensor-core tile (block_m 16 or more), whose grid covers any M.

    With `silu_and_mul`, the weight is a gated MLP's merged [gate; up] and the result
    SiLU(x gate^T) * (x up^T), [M, N / 2], the activation applied to the accumulators.
    """
    k = _check(qweight, scales, offsets, fmt)
    n, m = qweight.shape[0], x.shape[0]
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x {tuple(x.shape)} does not fit a [{n}, {k}] weight")
    if m > MAX_TOKENS and (config is None or config.block_m < 16):
        raise ValueError(f"quant_linear takes at most {MAX_TOKENS} tokens without a tensor-core tile, got {m}")
    if config is not None and config.block_m < 16 and m > config.block_m:
        raise ValueError(f"the FMA kernel's block_m {config.block_m} must cover all {m} tokens")
    if x.stride(1) != 1 or x.dtype != scales.dtype:
        raise ValueError("x needs contiguous rows and the scales' dtype")
    if silu_and_mul and (n % 2 or bias is not None):
        raise ValueError("silu_and_mul needs a [gate; up] weight of even height and no bias")
    cfg = config or quant_linear_config(m, n, k, fmt, silu_and_mul)
    if cfg.split_k > 1 and m > cfg.block_m:
        raise ValueError(f"split_k needs one row tile: {m} tokens in tiles of {cfg.block_m}")
    out_n = n // 2 if silu_and_mul else n
    out = torch.empty(m, out_n, dtype=x.dtype, device=x.device)
    if not m:
        return out
    scale_in_loop = scales_in_loop(fmt, k)
    partial = partial_sums(cfg.split_k, cfg.block_m, out) if cfg.split_k > 1 else None
    block_k = cfg.block_k
    if cfg.block_m < 16:
        kernel, grid = _quant_gemv_kernel, (triton.cdiv(out_n, cfg.block_n), cfg.split_k)
        kernel_flags = dict(X_PAIRS=_pairs_aligned(x))
    else:
        row_tiles_or_slices = triton.cdiv(m, cfg.block_m) if cfg.split_k == 1 else cfg.split_k
        kernel, grid = _quant_linear_kernel, (triton.cdiv(out_n, cfg.block_n), row_tiles_or_slices)
        group_steps, block_k = tensor_core_steps(fmt, k, block_k)
        kernel_flags = dict(FP32=x.dtype == torch.float32, GROUP_STEPS=group_steps)
    kernel[grid](
        x_ptr=x, w_ptr=qweight, s_ptr=scales, o_ptr=offsets, bias_ptr=bias, out_ptr=out, partial_ptr=partial,
        SPLIT_K=cfg.split_k, M=m, N=out_n, K=k,
        stride_xm=x.stride(0), stride_wn=qweight.stride(0), stride_sn=scales.stride(0), stride_om=out.stride(0),
        BITS=fmt.bits, GROUP=fmt.group_size, ASYMMETRIC=fmt.asymmetric, SCALE_IN_LOOP=scale_in_loop,
        EVEN=k % block_k == 0 and out_n % cfg.block_n == 0, BLOCK_N=cfg.block_n, BLOCK_K=block_k,
        NUM_STAGES=cfg.num_stages, HAS_BIAS=bias is not None, SILU_AND_MUL=silu_and_mul, BLOCK_M=cfg.block_m,
        num_warps=cfg.num_warps, **kernel_flags, **pdl_launch(x.device),
    )
    if partial is not None:  # per-channel scales (not in the loop) and bias go on as the slices are added
        reduce_partial_sums(partial, scales, bias, out, has_scale=not scale_in_loop, silu_and_mul=silu_and_mul)
    return out


@triton.jit
def _dequantize_kernel(
    w_ptr, s_ptr, o_ptr, out_ptr, N, K, stride_wn, stride_sn,
    BITS: tl.constexpr, GROUP: tl.constexpr, ASYMMETRIC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
):
    PACK: tl.constexpr = 32 // BITS
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    word_cols = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    w_mask = (rows < N)[:, None] & (word_cols < K // PACK)[None, :]
    words = tl.load(w_ptr + rows[:, None] * stride_wn + word_cols[None, :], mask=w_mask, other=0)
    w = _dequantize_words(words, s_ptr, o_ptr, rows, word_cols, w_mask, stride_sn, BITS, GROUP, ASYMMETRIC, True,
                          False, out_ptr.dtype.element_ty)
    cols = tl.program_id(1) * BLOCK_W * PACK + tl.arange(0, BLOCK_W * PACK)
    mask = (rows < N)[:, None] & (cols < K)[None, :]
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], w, mask=mask)  # whole runs of a row: coalesced


def dequantize(
    qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None, fmt: PackedFormat
) -> torch.Tensor:
    """The packed weight as a [N, K] tensor in the scales' dtype (for cuBLAS at many tokens)."""
    k = _check(qweight, scales, offsets, fmt)
    n = qweight.shape[0]
    out = torch.empty(n, k, dtype=scales.dtype, device=scales.device)
    block_n, block_w = 32, 32
    _dequantize_kernel[(triton.cdiv(n, block_n), triton.cdiv(k // fmt.pack, block_w))](
        qweight, scales, offsets, out, n, k, qweight.stride(0), scales.stride(0),
        BITS=fmt.bits, GROUP=fmt.group_size, ASYMMETRIC=fmt.asymmetric, BLOCK_N=block_n, BLOCK_W=block_w,
    )
    return out
