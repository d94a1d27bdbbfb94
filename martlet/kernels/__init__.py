"""Triton kernels for the GPU path. Each has a PyTorch reference in `martlet.layers` it is tested against.

    paged.py       what the attention kernels share: addressing a paged K/V tile, one online-softmax step
    rotary_kv.py   rotary embedding on q and k, and the store of k and v into the paged cache: one kernel
    prefill.py     causal flash attention over a packed batch, every key read through the block table
    decode.py      flash decoding: split-K over the paged context, then a log-sum-exp merge
    norm.py        RMSNorm, with the residual add fused in; per-head (Qwen3 QK) norm through the same kernel;
                   optionally quantizing its rows per token for W8A8
    activation.py  SiLU(gate) * up over the merged [gate | up] projection, optionally quantized per token
    linear.py      the few-token matmul: decode at small batch, one pass over the weight (fp16/bf16 or
                   8-bit codes with a scale per output feature)
    backend.py     TritonAttentionBackend: the attention kernels behind the backend seam
    pdl.py         programmatic dependent launch: a decode-path kernel is placed while the one before ends

The KV cache layout, `[num_blocks, num_kv_heads, block_size, head_dim]` for K and again for V:

- Every attention program works on one (sequence, KV head, run of keys). With the head outside the
  slot, one page of one head is a contiguous `block_size x head_dim` tile (4 KiB for 16 x 128 bf16),
  so gathering a key tile through the block table reads whole contiguous pages, each row split into
  16-byte vector loads. Token-major pages (`[num_blocks, block_size, num_kv_heads, head_dim]`) would
  interleave the heads and stride every row by `num_kv_heads * head_dim`: the same bytes in 16
  separate 256-byte runs instead of one 4 KiB run, and no single 2-D box a bulk tensor copy could fetch.
- K and V share the layout and strides in the model's dtype (an 8-bit V differs: below).
- Both matmuls want the K/V tile as `[keys, head_dim]` rows: `tl.dot(q, tl.trans(k))` transposes in
  shared memory for free, so K needs none of the split `[.., head_dim / x, block_size, x]` layout old
  CUDA paged-attention kernels used.
- The write side scatters one `head_dim` row per (new token, head): a step writes only its new
  tokens, so that is small next to the reads.

8-bit caches (`kv_cache_dtype="int8"` or `"fp8"`, `martlet/layers/kv_cache.py`) keep this shape for the
codes and add one fp16 scale per (token, KV head): x ~= code * scale, scale = max|x| / 127 (int8) or
/ 448 (fp8 e4m3), one group of G = head_dim channels. Each (block, head) tile is its codes and then its
block_size scales, one contiguous run (2,080 bytes for 16 x 128 against 4,096 in fp16: 1.97x the
tokens in the same memory), addressed with the codes' strides and a scale view's.

- G = head_dim: a scale per row is what lets the kernels keep the 8-bit tile as it is: the K scale
  multiplies the row's logit and the V scale its probability, so nothing is dequantized per element
  beyond widening the code to fp16. Smaller groups would cost a multiply per element and twice the
  scale bytes (1.88x the tokens for G = 64 with fp32 scales, under the 1.9x the format must reach). On
  real text an int8 cache agrees with the unquantized one on 97.5% of next tokens (tests/test_kv_cache_quant.py).
- fp8 gets the same per-row scale, computed as the row is written: no calibration, and the whole e4m3
  range serves each row (a per-tensor scale, vLLM's default, wastes it on quiet heads).
- Scales are computed from the row alone, so a recomputed (preempted) or prefix-cached row has exactly
  the codes it had.
- V's codes are stored channel-major within the tile (`[head_dim, block_size]`, seen through a
  transposed view): the P.V product reduces over keys, and an 8-bit tile with keys contiguous loads
  into the tensor cores' operand layout with `ldmatrix`, where a key-major one took one shared-memory
  load per byte (ldmatrix.trans moves 16-bit elements only). K stays key-major, as Q.K^T reduces
  over channels. The write of a new token's V row is then a strided scatter, small next to the reads.
- An 8-bit cache's blocks default to 128 tokens (`default_block_size`): a V channel's codes in a block
  are then one 128-byte line. With 16-token blocks each load instruction fetched 64 bytes (four
  channels' 16-byte runs, half a line) from each of eight blocks, and decode over int8 stayed near
  70% of copy bandwidth at batch 256; with 128 it reaches about 90%.
- `rotary_kv.py` quantizes the rotated k and v while they are in registers (absmax per head row, one
  store of codes and one of scales); `paged.load_kv_tile` and `paged.load_scales` read a tile's
  codes and scales (decode loads the scales a tile ahead), and `paged.online_softmax_step` applies
  them.
"""
