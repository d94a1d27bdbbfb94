"""The engine core: requests in, one step at a time, outputs out.

`step()` is the whole loop: schedule, launch, collect. Everything about text (tokenizing,
detokenizing, stop strings) sits at the edges, in `add_request` and `_check_finished`, and only
for requests with `detokenize=True`, so a front end that does those elsewhere (the server) can
drive the same core.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch

from martlet.config import KV_CACHE_DTYPES, QUANTIZATIONS, EngineConfig, ModelConfig
from martlet.engine.block_manager import BlockManager
from martlet.engine.detokenizer import IncrementalDetokenizer
from martlet.engine.model_runner import LaunchedStep, ModelRunner
from martlet.engine.scheduler import ScheduledBatch, Scheduler
from martlet.engine.sequence import PLACEHOLDER, Sequence
from martlet.layers.attention import get_attention_backend
from martlet.layers.sampler import has_penalty
from martlet.models.loader import build_model, is_gguf, load_tokenizer, read_model_config
from martlet.outputs import CompletionOutput, RequestOutput
from martlet.sampling_params import SamplingParams

logger = logging.getLogger("martlet")

OutputKind = Literal["cumulative", "delta", "final"]

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


class LLMEngine:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, tokenizer, quiet: bool = False) -> None:
        self.config = config
        self.model_config = model_config
        self.tokenizer = tokenizer
        backend = get_attention_backend(config.attention_backend)
        model = build_model(
            config.model, model_config, backend, dtype=config.dtype, device=config.device,
            max_positions=config.max_model_len, load_format=config.load_format, quiet=quiet,
        )
        self.runner = ModelRunner(config, model_config, model)
        num_blocks = self.runner.num_kv_blocks
        capacity = num_blocks * config.block_size
        if capacity < config.max_model_len:
            raise ValueError(
                f"the KV cache holds {capacity} tokens ({num_blocks} blocks of {config.block_size}), "
                f"fewer than max_model_len={config.max_model_len}: raise num_kv_blocks or "
                "gpu_memory_utilization, or lower max_model_len"
            )
        if not quiet:
            logger.info("KV cache: %d blocks of %d tokens = %d tokens", num_blocks, config.block_size, capacity)
        self.block_manager = BlockManager(num_blocks, config.block_size)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.max_model_len)
        self.eos_token_ids = _eos_token_ids(config.model, model_config, tokenizer)
        # Called with every scheduled batch before it runs (benchmarks count its cost).
        self.on_step: Callable[[ScheduledBatch], None] | None = None
        self.requests: dict[str, Sequence] = {}
        self.in_flight: LaunchedStep | None = None  # launched, tokens not collected yet
        self.in_flight_slots: list[int] = []  # where each of its tokens goes in its sequence
        self.detokenizers: dict[str, IncrementalDetokenizer] = {}
        self._ids = itertools.count()

    @classmethod
    def from_args(
        cls, model: str, *, dtype: str | torch.dtype = "auto", device: str = "auto",
        max_model_len: int | None = None, max_num_seqs: int = 256, max_num_batched_tokens: int = 8192,
        block_size: int = 16, num_kv_blocks: int | None = None, gpu_memory_utilization: float = 0.9,
        seed: int = 0, load_format: str = "auto", attention_backend: str | None = None,
        enforce_eager: bool = False, kv_cache_dtype: str = "auto", quantization: str | None = None,
        quiet: bool = False,
    ) -> LLMEngine:
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {kv_cache_dtype!r}")
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
        model_config = read_model_config(model)
        resolved_device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        )
        _check_positive(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                        block_size=block_size, num_kv_blocks=num_kv_blocks, max_model_len=max_model_len)
        if not 0.0 < gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        limit = model_config.max_position_embeddings
        if max_model_len is None:
            max_model_len = limit
            if num_kv_blocks is not None:  # a pool chosen by hand bounds the context too
                max_model_len = min(max_model_len, num_kv_blocks * block_size)
        elif max_model_len > limit:
            raise ValueError(f"max_model_len={max_model_len} exceeds the model's limit of {limit} positions")
        config = EngineConfig(
            model=str(model),
            dtype=_resolve_dtype(dtype, model_config, resolved_device),
            device=resolved_device,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            block_size=block_size,
            num_kv_blocks=num_kv_blocks,
            gpu_memory_utilization=gpu_memory_utilization,
            seed=seed,
            load_format=load_format,
            attention_backend=attention_backend or ("triton" if resolved_device.type == "cuda" else "torch"),
            enforce_eager=enforce_eager,
            kv_cache_dtype=kv_cache_dtype,
            quantization=quantization,
        )
        torch.manual_seed(seed)
        return cls(config, model_config, _try_tokenizer(model), quiet=quiet)

    # ---- requests ----------------------------------------------------------------------------

    def tokenize(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: pass {'prompt_token_ids': [...]} instead of text")
        return self.tokenizer.encode(prompt)

    def validate_request(self, token_ids: list[int], params: SamplingParams) -> None:
        """Everything about a request that can be wrong, checked before it is queued."""
        validate_request(token_ids, params, max_model_len=self.config.max_model_len,
                         vocab_size=self.model_config.vocab_size)
        if params.stop_strings and self.tokenizer is None:
            raise ValueError("SamplingParams.stop needs a tokenizer, and this model has none: use stop_token_ids")

    def add_request(
        self, prompt_token_ids: list[int], params: SamplingParams, *, prompt: str | None = None,
        request_id: str | None = None,
    ) -> str:
        self.validate_request(prompt_token_ids, params)
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.config.device).manual_seed(params.seed)
        seq = Sequence(request_id, prompt_token_ids, params, self.eos_token_ids, prompt, generator)
        self.requests[request_id] = seq
        if params.detokenize and self.tokenizer is not None:
            self.detokenizers[request_id] = IncrementalDetokenizer(
                self.tokenizer, prompt_token_ids, params.stop_strings, params.skip_special_tokens
            )
        self.scheduler.add(seq)
        return request_id

    def abort_request(self, request_id: str) -> None:
        """Drop a request wherever it is; its blocks are free when this returns."""
        seq = self.requests.pop(request_id, None)
        self.detokenizers.pop(request_id, None)
        if seq is not None and not seq.is_finished:
            self.scheduler.finish(seq, "abort")

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0 or self.in_flight is not None

    # ---- the loop ----------------------------------------------------------------------------

    def step(self, output_kind: OutputKind = "cumulative") -> list[RequestOutput]:
        """Schedule and launch a step, then collect the tokens of the step before it.

        The device runs step N while the host schedules and launches step N+1; only then does
        the host wait for step N's tokens (the one sync), which were sampled into the device-side
        input of N+1 already. A sequence that finishes at step N has one step computed in vain.

        Returns, per `output_kind`: "cumulative", an output with all tokens so far for every
        request that got a token; "delta", the same but with only this step's token in `token_ids`
        and `logprobs` (text stays cumulative), which saves copying long outputs every step;
        "final", the whole output of every request that finished.
        """
        outputs = []
        if self.in_flight is not None and any(has_penalty(s) for s in self.scheduler.running):
            outputs = self._collect(output_kind)  # penalties count the output tokens on the host
        batch = self.scheduler.schedule()
        launched = None
        if batch:
            if self.on_step is not None:
                self.on_step(batch)
            launched = self.runner.execute(batch)
            for seq, n in zip(batch.seqs, batch.num_new_tokens):
                seq.num_computed_tokens += n
        outputs += self._collect(output_kind)
        if launched is not None:
            self.in_flight = launched
            self.in_flight_slots = [len(seq) for seq in launched.seqs]
            for seq in launched.seqs:
                if not seq.is_finished:  # one that just finished keeps no trace of the wasted step
                    seq.append_token(PLACEHOLDER)
        return outputs

    def _collect(self, output_kind: OutputKind) -> list[RequestOutput]:
        """Wait for the step in flight; put its tokens in place and see who finished."""
        launched, slots = self.in_flight, self.in_flight_slots
        if launched is None:
            return []
        self.in_flight = None
        token_ids, logprobs = launched.results()
        now = time.perf_counter()
        outputs = []
        for i, seq in enumerate(launched.seqs):
            if seq.is_finished:  # finished or aborted while the step ran: its token is dropped
                continue
            seq.token_ids[slots[i]] = token_ids[i]
            if logprobs is not None and seq.params.logprobs is not None:
                seq.output_logprobs.append(logprobs[i])
            if seq.metrics.first_token_time is None:
                seq.metrics.first_token_time = now
            self._check_finished(seq, slots[i])
            if seq.is_finished or output_kind != "final":
                outputs.append(self.make_output(seq, slots[i] if output_kind == "delta" else None))
            if seq.is_finished:
                self.requests.pop(seq.request_id, None)
                self.detokenizers.pop(seq.request_id, None)
        return outputs

    def _check_finished(self, seq: Sequence, slot: int) -> None:
        """Stop conditions for the token now at `slot` (a later one may be in flight already)."""
        params, token = seq.params, seq.token_ids[slot]
        num_output = slot + 1 - seq.num_prompt_tokens
        if token in params.stop_token_ids:
            return self._finish(seq, slot, "stop", token)
        if token in self.eos_token_ids and not params.ignore_eos:
            return self._finish(seq, slot, "stop")
        detok = self.detokenizers.get(seq.request_id)
        if detok is not None:
            # As in vLLM, stop strings count only once min_tokens are out.
            stop = detok.add_tokens([token], check_stop=num_output >= params.min_tokens)
            if stop is not None:
                return self._finish(seq, slot, "stop", stop)
        if seq.reached_length_limit(self.config.max_model_len, num_tokens=slot + 1):
            return self._finish(seq, slot, "length")

    def _finish(self, seq: Sequence, slot: int, reason: str, stop_reason: int | str | None = None) -> None:
        del seq.token_ids[slot + 1 :]  # a token launched after the last one is not output
        detok = self.detokenizers.get(seq.request_id)
        if detok is not None:
            detok.flush()
        self.scheduler.finish(seq, reason, stop_reason)

    def make_output(self, seq: Sequence, delta_slot: int | None = None) -> RequestOutput:
        """The request's output so far, or with `delta_slot` only the token at that slot."""
        detok = self.detokenizers.get(seq.request_id)
        logprobs = seq.output_logprobs if seq.params.logprobs is not None else None
        token_ids = seq.output_token_ids
        if delta_slot is not None:
            token_ids, logprobs = [seq.token_ids[delta_slot]], logprobs and logprobs[-1:]
        completion = CompletionOutput(
            index=0,
            # While running, only text no stop string can take back; all of it once finished.
            text="" if detok is None else (detok.text if seq.is_finished else detok.stable_text),
            token_ids=token_ids,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
            logprobs=logprobs,
        )
        return RequestOutput(
            request_id=seq.request_id,
            prompt=seq.prompt,
            prompt_token_ids=seq.token_ids[: seq.num_prompt_tokens],
            outputs=[completion],
            finished=seq.is_finished,
            metrics=seq.metrics,
        )


def validate_request(token_ids: list[int], params: SamplingParams, *, max_model_len: int, vocab_size: int) -> None:
    """`LLMEngine.validate_request` for a front end that holds no engine, only its limits (the
    server's engine runs in a process of its own, and a bad request must not cross over)."""
    if not isinstance(params, SamplingParams):
        raise ValueError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
    if any(t >= vocab_size for t in params.stop_token_ids):
        raise ValueError(f"SamplingParams.stop_token_ids must be in [0, {vocab_size}), got {params.stop_token_ids}")
    if not token_ids:
        raise ValueError("the prompt is empty: give at least one token")
    if len(token_ids) >= max_model_len:
        raise ValueError(
            f"the prompt is {len(token_ids)} tokens long, but max_model_len is "
            f"{max_model_len} (the prompt must leave room for at least one new token)"
        )
    bad = [t for t in token_ids if not (isinstance(t, int) and 0 <= t < vocab_size)]
    if bad:
        raise ValueError(f"prompt token ids must be integers in [0, {vocab_size}), got {bad[:5]}")


def _resolve_dtype(dtype: str | torch.dtype, cfg: ModelConfig, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cpu":
            return torch.float32  # exact and fast enough on CPUs; bf16 is there when asked for
        return cfg.torch_dtype if cfg.torch_dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def _check_positive(**values: int | None) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def _try_tokenizer(model: str):
    """The tokenizer, or None for a directory without one: such a model takes token ids only."""
    try:
        return load_tokenizer(model)
    except FileNotFoundError as e:
        logger.warning("%s: prompts must be token ids and outputs will have no text", e)
        return None


def _eos_token_ids(model: str, cfg: ModelConfig, tokenizer) -> list[int]:
    """End-of-sequence ids from the config, generation_config.json and the tokenizer."""
    ids = list(cfg.eos_token_ids)
    gen_config = Path(model) / "generation_config.json"
    if not is_gguf(model) and gen_config.is_file():
        eos = json.loads(gen_config.read_text()).get("eos_token_id")
        ids += [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))
