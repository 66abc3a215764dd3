"""Inference engine: KV cache, sampling, batched generation."""

from gptoss.engine.generate import Generation, generate, generate_stream, init_cache
from gptoss.engine.sampling import SamplingParams, filter_logits, sample

__all__ = ["Generation", "SamplingParams", "filter_logits", "generate", "generate_stream", "init_cache", "sample"]
