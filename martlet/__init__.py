"""Martlet: a high-performance LLM inference and serving engine."""

from martlet.llm import LLM
from martlet.outputs import CompletionOutput, RequestOutput
from martlet.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"
