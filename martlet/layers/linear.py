"""The model's linear layers. How a layer stores its weight and multiplies by it is its
`LinearMethod` (`martlet.layers.quantization`): the model builds every layer the same way and the
format decides the rest.

With tensor parallelism (Megatron's split) a layer holds one rank's share of the weight:
column-parallel layers (QKV, gate_up, the LM head) their outputs, row-parallel ones (o, down) their
inputs, summed over the ranks by one all-reduce. Whatever the format, a rank loads only its share:
each parameter says which of its dimensions holds outputs and inputs, and how many of them one
element covers (`output_dim`, `pack_factor`, `input_dim`, `input_pack`).

Unquantized: cuBLAS for many tokens, one Triton weight pass for a few. A decode step at small
batch multiplies a handful of token rows by every weight matrix: the time is the weight's trip
from memory. `martlet.kernels.linear.skinny_linear` makes that trip in one launch, where cuBLAS
adds a split-K reduce kernel for the narrower matrices.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from martlet import distributed
from martlet.layers.quantization.base import LinearMethod, QuantizationConfig, register_bias


class UnquantizedLinearMethod(LinearMethod):
    def create_weights(self, layer: nn.Module, in_features: int, out_features: int, bias: bool) -> None:
        layer.weight = nn.Parameter(torch.empty(out_features, in_features))
        register_bias(layer, out_features, bias)

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            from martlet.kernels import linear

            if x.shape[0] <= linear.MAX_TOKENS:
                return linear.skinny_linear(x, layer.weight, layer.bias)
        return F.linear(x, layer.weight, layer.bias)

    def apply_silu_and_mul(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Up to 16 tokens on the GPU the activation runs on the matmul's accumulators, in the same kernel."""
        if x.is_cuda:
            from martlet.kernels import linear

            if x.shape[0] <= linear.SILU_AND_MUL_MAX_TOKENS:
                return linear.skinny_linear(x, layer.weight, silu_and_mul=True)
        return super().apply_silu_and_mul(layer, x)


class Linear(nn.Module):
    """y = x W^T + b, W stored as the model's `QuantizationConfig` says (unquantized without one)."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, quant: QuantizationConfig | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.method = UnquantizedLinearMethod() if quant is None else quant.linear_method(prefix)
        self.method.create_weights(self, in_features, out_features, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x)


class ColumnParallelLinear(Linear):
    """Each rank computes its share of the outputs; no communication.

    `pieces` are the checkpoint tensors stacked in the layer (Q, K, V or gate, up), each as
    (first output row this rank takes, how many): the rank's weight is its rows of every piece.
    """

    def __init__(
        self, in_features: int, pieces: list[tuple[int, int]], bias: bool = True,
        quant: QuantizationConfig | None = None, prefix: str = "",
    ) -> None:
        sizes = [size for _, size in pieces]
        # (where in this layer, where in the checkpoint tensor, how many) output rows, per piece
        self.pieces = [(start, src, size) for start, (src, size) in zip(itertools.accumulate(sizes, initial=0), pieces)]
        super().__init__(in_features, sum(sizes), bias, quant, prefix)
        for param in self.parameters(recurse=False):
            param.weight_loader = self.load_piece

    def load_piece(self, param: nn.Parameter, tensor: torch.Tensor, name: str, piece: int = 0) -> None:
        start, src, size = self.pieces[piece]
        load_weight(param, tensor, name, slice(start, start + size), slice(src, src + size))


def even_split(sizes: list[int], what: str) -> list[tuple[int, int]]:
    """This rank's equal share of each piece, as `ColumnParallelLinear` takes them."""
    tp, rank = distributed.tp_size(), distributed.tp_rank()
    if any(size % tp for size in sizes):
        raise ValueError(f"{what} ({sizes}) must divide by tensor_parallel_size={tp}")
    return [(rank * size // tp, size // tp) for size in sizes]


class QKVParallelLinear(ColumnParallelLinear):
    """Q, K and V in one layer, split by heads: each rank gets num_heads / tp query heads and the KV
    heads they read. With more ranks than KV heads, each KV head is replicated on tp / num_kv_heads
    ranks. `num_heads` and `num_kv_heads` are this rank's."""

    def __init__(
        self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, bias: bool,
        quant: QuantizationConfig | None, prefix: str,
    ) -> None:
        tp, rank = distributed.tp_size(), distributed.tp_rank()
        if num_heads % tp or (num_kv_heads % tp if tp <= num_kv_heads else tp % num_kv_heads):
            raise ValueError(f"tensor_parallel_size={tp} must divide the model's {num_heads} attention heads, and "
                             f"divide or be a multiple of its {num_kv_heads} KV heads")
        self.num_heads, self.num_kv_heads = num_heads // tp, max(1, num_kv_heads // tp)
        replicas = max(1, tp // num_kv_heads)  # ranks that hold the same KV heads
        q, kv = self.num_heads * head_dim, self.num_kv_heads * head_dim
        kv_src = rank // replicas * kv
        super().__init__(hidden_size, [(rank * q, q), (kv_src, kv), (kv_src, kv)], bias, quant, prefix)


class SiluGateUpLinear(ColumnParallelLinear):
    """A gated MLP's merged [gate; up] projection with its activation: x -> SiLU(x gate^T) * (x up^T)."""

    def __init__(
        self, in_features: int, out_features: int, quant: QuantizationConfig | None = None, prefix: str = ""
    ) -> None:
        super().__init__(in_features, even_split([out_features // 2] * 2, "intermediate_size"), bias=False,
                         quant=quant, prefix=prefix)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply_silu_and_mul(self, x)


class RowParallelLinear(Linear):
    """Each rank multiplies its share of the inputs (the column-parallel layer before it left them
    split) and the partial sums are added over the ranks: one all-reduce."""

    def __init__(self, in_features: int, out_features: int, quant: QuantizationConfig | None, prefix: str) -> None:
        ((src, size),) = even_split([in_features], f"{prefix} inputs")
        self.src_cols = slice(src, src + size)
        super().__init__(size, out_features, bias=False, quant=quant, prefix=prefix)
        self.reduce = distributed.tp_size() > 1
        for param in self.parameters(recurse=False):
            param.weight_loader = self.load_share

    def load_share(self, param: nn.Parameter, tensor: torch.Tensor, name: str) -> None:
        load_weight(param, tensor, name, src_cols=self.src_cols)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.method.apply(self, x)
        return distributed.all_reduce(y) if self.reduce else y


def vocab_share(vocab_size: int) -> tuple[int, int, int]:
    """This rank's rows of a vocabulary-parallel weight: (first token, how many, rows held). Every
    rank holds ceil(vocab / tp) rows; the last ones pad theirs."""
    tp, rank = distributed.tp_size(), distributed.tp_rank()
    rows = -(-vocab_size // tp)
    start = min(rank * rows, vocab_size)
    return start, min(rows, vocab_size - start), rows


class VocabParallelEmbedding(nn.Embedding):
    """Each rank looks up the tokens in its share of the vocabulary, zeros for the others; an
    all-reduce puts every token's row together."""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        self.start, self.size, rows = vocab_share(vocab_size)
        super().__init__(rows, hidden_size)
        self.weight.weight_loader = self.load_share
        self.split = distributed.tp_size() > 1

    def load_share(self, param: nn.Parameter, tensor: torch.Tensor, name: str) -> None:
        load_weight(param, tensor, name, slice(0, self.size), slice(self.start, self.start + self.size))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not self.split:
            return super().forward(input_ids)
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.size)
        rows = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside[:, None], 0)
        return distributed.all_reduce(rows)


class ParallelLMHead(Linear):
    """The LM head, vocabulary-parallel: each rank scores its share of the vocabulary.

    The shares are all-gathered, so that one sampler on the driver sees whole rows: per-request
    generators, penalties, grammars and logprobs then live in one place, as with one GPU, and
    sampling stays bit for bit the same for any tensor_parallel_size. An all-gather rather than a
    gather to rank 0, because it is one NCCL call with a fixed-size output, which CUDA graphs
    capture; the workers drop their copy.
    """

    def __init__(self, hidden_size: int, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.start, self.size, rows = vocab_share(vocab_size)
        super().__init__(hidden_size, rows, bias=False)
        self.weight.weight_loader = self.load_share
        self.split = distributed.tp_size() > 1

    load_share = VocabParallelEmbedding.load_share

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x)
        return distributed.all_gather(logits)[..., : self.vocab_size] if self.split else logits


def load_weight(
    param: nn.Parameter, tensor: torch.Tensor, name: str, rows: slice | None = None, src_rows: slice | None = None,
    src_cols: slice | None = None,
) -> None:
    """Copy checkpoint tensor `name` into `param`, or into output rows `rows` of a merged layer's param.

    With tensor parallelism the rank takes output rows `src_rows` or input columns `src_cols` of the
    checkpoint tensor only; `tensor` may then be a lazy slice (safetensors' `get_slice`, GGUF's
    `LazyTensor`), so that only those are read from the file.

    Quantized checkpoints store some tensors with the outputs in dimension 1, or several outputs
    packed into one element: such a param carries `output_dim` (None: shared by every output, so
    each shard holds all of it) and `pack_factor` attributes. A param with `scalar_fills_rows` (FP8's
    weight scales) takes one number for all its rows as well as one per row.
    """
    shape = tuple(tensor.get_shape()) if hasattr(tensor, "get_shape") else tuple(tensor.shape)
    index = [slice(None)] * len(shape)
    output_dim = getattr(param, "output_dim", 0)
    # A weight's inputs are its dimension 1; a vector shared by every output (GPTQ's g_idx, SmoothQuant's
    # pre_quant_scale) is one entry per input.
    input_dim = getattr(param, "input_dim", 1 if param.dim() == 2 else 0 if output_dim is None else None)
    whole = getattr(param, "scalar_fills_rows", False) and math.prod(shape) == 1  # one number for every row
    for dim, span, per in ((output_dim, src_rows, getattr(param, "pack_factor", 1)),
                           (input_dim, src_cols, getattr(param, "input_pack", 1))):
        if span is not None and dim is not None and not whole:
            if span.start % per or span.stop % per:
                raise ValueError(f"{name}: this rank's share {span.start}:{span.stop} of dimension {dim} is not "
                                 f"whole elements of {per}; choose another tensor_parallel_size")
            index[dim] = slice(span.start // per, span.stop // per)
    tensor = tensor[tuple(index)] if index else tensor[...]
    target = param.data
    if rows is not None and output_dim is not None:
        pack = getattr(param, "pack_factor", 1)
        if rows.start % pack or rows.stop % pack:
            raise ValueError(f"{name}: output rows {rows.start}:{rows.stop} are not whole packed elements of {pack}")
        target = target.narrow(output_dim, rows.start // pack, (rows.stop - rows.start) // pack)
    if getattr(param, "scalar_fills_rows", False) and tensor.numel() in (1, target.numel()):
        tensor = tensor.reshape(-1).expand(target.numel()).reshape(target.shape)  # per tensor or per row
    if target.shape != tensor.shape:
        raise ValueError(f"checkpoint tensor {name!r} is {tuple(tensor.shape)}, expected {tuple(target.shape)}")
    target.copy_(tensor)
