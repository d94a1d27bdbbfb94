"""Triton kernels for the GPU path. Each has a PyTorch reference in `martlet.layers` it is tested against.

    paged.py       what the attention kernels share: addressing a paged K/V tile, one online-softmax step
    rotary_kv.py   rotary embedding on q and k, and the store of k and v into the paged cache: one kernel
    prefill.py     causal flash attention over a packed batch, every key read through the block table
    decode.py      flash decoding: split-K over the paged context, then a log-sum-exp merge
    norm.py        RMSNorm, with the residual add fused in; per-head (Qwen3 QK) norm through the same kernel
    activation.py  SiLU(gate) * up over the merged [gate | up] projection
    linear.py      the few-token matmul: decode at small batch, one pass over the weight
    backend.py     TritonAttentionBackend: the attention kernels behind the backend seam
    pdl.py         programmatic dependent launch: a decode-path kernel is placed while the one before ends

The KV cache layout, `[num_blocks, num_kv_heads, block_size, head_dim]` for K and again for V:

- Every attention program works on one (sequence, KV head, run of keys). With the head outside the
  slot, one page of one head is a contiguous `block_size x head_dim` tile (4 KiB for 16 x 128 bf16),
  so gathering a key tile through the block table reads whole contiguous pages, each row split into
  16-byte vector loads. Token-major pages (`[num_blocks, block_size, num_kv_heads, head_dim]`) would
  interleave the heads and stride every row by `num_kv_heads * head_dim`: the same bytes in 16
  separate 256-byte runs instead of one 4 KiB run, and no single 2-D box a bulk tensor copy could fetch.
- K and V share the layout and strides, so one offset computation serves both loads.
- Both matmuls want the K/V tile as `[keys, head_dim]` rows: `tl.dot(q, tl.trans(k))` transposes in
  shared memory for free, so K needs none of the split `[.., head_dim / x, block_size, x]` layout old
  CUDA paged-attention kernels used.
- The write side scatters one `head_dim` row per (new token, head): a step writes only its new
  tokens, so that is small next to the reads.

INT8 KV (next issue) keeps this shape with an int8 dtype, plus a scale tensor
`[num_blocks, num_kv_heads, block_size, head_dim // group]` addressed by the same page/slot offsets.
`rotary_kv.py` already holds each rotated head row in registers, so it quantizes there (absmax per
group, one store of int8 and one of scales). The attention kernels load the int8 tile through the
same `paged_offsets`, load the matching scales, and dequantize in registers before `tl.dot` (with
one group per head row, the K scale multiplies the logits and the V scale the probabilities
instead). Decode is bound by the bytes it reads, so it runs about twice as fast.
"""
