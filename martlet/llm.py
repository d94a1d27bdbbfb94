"""The offline Python API, shaped like vLLM's: `LLM(model).generate(prompts, SamplingParams())`."""

from __future__ import annotations

from collections.abc import Iterator
from collections.abc import Sequence as SequenceABC

from tqdm import tqdm

from martlet.engine.llm_engine import LLMEngine
from martlet.outputs import RequestOutput
from martlet.sampling_params import SamplingParams

# A prompt is text, or {"prompt_token_ids": [...]} for pre-tokenized input.
Prompt = str | dict


class LLM:
    """A model loaded for offline generation.

    `model` is a Hugging Face model directory or a `.gguf` file; the other arguments are vLLM's
    (see README). `num_kv_blocks` sets the KV pool size directly instead of from free memory.
    """

    def __init__(self, model: str, **engine_args) -> None:
        self.engine = LLMEngine.from_args(str(model), **engine_args)

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | list[Prompt],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt together; outputs come back in input order.

        Every prompt is checked before any starts, so a bad one rejects the call and leaves the
        engine as it was.
        """
        if not isinstance(prompts, (list, tuple)):
            prompts = [prompts]
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(
                f"got {len(prompts)} prompts but {len(sampling_params)} sampling params; "
                "pass one SamplingParams or one per prompt"
            )
        requests = [self._tokenize(p) for p in prompts]
        for (token_ids, _), params in zip(requests, sampling_params):
            self.engine.validate_request(token_ids, params)
        order: dict[str, int] = {}
        try:
            for i, ((token_ids, text), params) in enumerate(zip(requests, sampling_params)):
                order[self.engine.add_request(token_ids, params, prompt=text)] = i
        except BaseException:  # all or nothing: leave no request of this call behind
            for request_id in order:
                self.engine.abort_request(request_id)
            raise
        return self._run(order, use_tqdm)

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Generate for one prompt, yielding its output after every new token."""
        token_ids, text = self._tokenize(prompt)
        request_id = self.engine.add_request(token_ids, sampling_params or SamplingParams(), prompt=text)
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.request_id == request_id:
                        yield out
                        if out.finished:
                            return
        finally:
            self.engine.abort_request(request_id)

    def chat(
        self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate replies to conversations rendered with the model's chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.apply_chat_template(c) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def apply_chat_template(self, messages: list[dict]) -> str:
        tokenizer = self.engine.tokenizer
        if tokenizer is None or not tokenizer.chat_template:
            raise ValueError("this model has no chat template")
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def _tokenize(self, prompt: Prompt) -> tuple[list[int], str | None]:
        if isinstance(prompt, str):
            return self.engine.tokenize(prompt), prompt
        if isinstance(prompt, dict) and isinstance(prompt.get("prompt_token_ids"), SequenceABC):
            return list(prompt["prompt_token_ids"]), None
        raise ValueError(f"a prompt must be a string or {{'prompt_token_ids': [...]}}, got {prompt!r:.80}")

    def _run(self, order: dict[str, int], use_tqdm: bool) -> list[RequestOutput]:
        results: list[RequestOutput | None] = [None] * len(order)
        with tqdm(total=len(order), desc="Generating", unit="req", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step("final"):
                    if out.request_id in order:
                        results[order[out.request_id]] = out
                        bar.update(1)
        return results  # type: ignore[return-value]
