"""Write a GGUF file of random quantized weights shaped like a Hugging Face config (for benchmarks).

    python3 benchmarks/write_dummy_gguf.py --config-dir benchmarks/models/llama-2-7b --type q4_k OUT.gguf

--type: q4_0, q4_k, or q4_k_m (llama.cpp's Q4_K_M mix: Q6_K for attn_v and ffn_down in every other
layer, Q4_K elsewhere, so merged layers mix types). Linear layers get random blocks, their scales
sized so weights stay within about +-0.02 as the engine's dummy weights do; embeddings and the LM
head are F16, norms F32 ones. The tokenizer is a made-up SentencePiece-style vocabulary of the
config's size (benchmarks prompt with random token ids).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import gguf
import numpy as np

Q = gguf.GGMLQuantizationType
# Byte offset of each fp16 field in a block and its size: weights = scale products up to ~0.02.
FP16_FIELDS = {
    Q.Q4_0: [(0, 0.02 / 8)],  # d, codes - 8 up to 8
    Q.Q4_K: [(0, 0.02 / (63 * 15)), (2, 0.02 / 63)],  # d, dmin; 6-bit sub-block scales and mins
    Q.Q6_K: [(208, 0.02 / (128 * 32))],  # d; int8 sub-block scales, codes - 32 up to 32
}


def random_blocks(qtype: Q, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    block_size, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (rows * cols // block_size, block_bytes), dtype=np.uint8)
    for start, size in FP16_FIELDS[qtype]:
        scale = (rng.random((len(blocks), 1), dtype=np.float32) * 0.5 + 0.5) * size
        blocks[:, start : start + 2] = scale.astype(np.float16).view(np.uint8)
    return blocks.reshape(rows, -1)


def storage_type(kind: str, layer: int, quant: str) -> Q:
    if quant == "q4_0":
        return Q.Q4_0
    if quant == "q4_k_m" and kind in ("v_proj", "down_proj") and layer % 2 == 0:
        return Q.Q6_K
    return Q.Q4_K


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--config-dir", default="benchmarks/models/llama-2-7b")
    ap.add_argument("--type", choices=("q4_0", "q4_k", "q4_k_m"), default="q4_k")
    args = ap.parse_args()
    cfg = json.loads((Path(args.config_dir) / "config.json").read_text())
    h, inter, layers, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads", heads)
    head_dim = cfg.get("head_dim", h // heads)
    rng = np.random.default_rng(0)

    writer = gguf.GGUFWriter(args.out, "llama")
    writer.add_block_count(layers)
    writer.add_context_length(cfg.get("max_position_embeddings", 4096))
    writer.add_embedding_length(h)
    writer.add_feed_forward_length(inter)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-5))
    writer.add_rope_freq_base(cfg.get("rope_theta", 10000.0))
    writer.add_tokenizer_model("llama")
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
    tokens += [f"\u2581t{i}" for i in range(vocab - len(tokens))]
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * 3 + [0.0] * 256 + [-float(i) for i in range(vocab - 259)])
    writer.add_token_types([2, 3, 3] + [6] * 256 + [1] * (vocab - 259))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, layers)
    shapes = {"q_proj": (heads * head_dim, h), "k_proj": (kv_heads * head_dim, h), "v_proj": (kv_heads * head_dim, h),
              "o_proj": (h, heads * head_dim), "gate_proj": (inter, h), "up_proj": (inter, h), "down_proj": (h, inter)}
    f16 = lambda rows, cols: (rng.random((rows, cols), dtype=np.float32) * 0.04 - 0.02).astype(np.float16)  # noqa: E731
    writer.add_tensor("token_embd.weight", f16(vocab, h))
    writer.add_tensor("output_norm.weight", np.ones(h, np.float32))
    writer.add_tensor("output.weight", f16(vocab, h))
    for i in range(layers):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            writer.add_tensor(names.get_name(f"model.layers.{i}.{norm}") + ".weight", np.ones(h, np.float32))
        for kind, (rows, cols) in shapes.items():
            module = "self_attn" if kind.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            qtype = storage_type(kind, i, args.type)
            name = names.get_name(f"model.layers.{i}.{module}.{kind}") + ".weight"
            writer.add_tensor(name, random_blocks(qtype, rows, cols, rng), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=True)
    writer.close()
    print(f"wrote {args.out} ({args.out.stat().st_size / 2**30:.2f} GiB, {args.type})")


if __name__ == "__main__":
    main()
