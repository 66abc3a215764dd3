"""Evaluation: likelihoods (perplexity, bits per byte, multiple choice), generative tasks (efforts, samples, pass@k)
and router introspection."""

from gptoss.eval.generative import evaluate, extract_choice, extract_number, pass_at_k
from gptoss.eval.likelihood import choice_logprobs, multiple_choice, perplexity, read_texts, token_logprobs
from gptoss.eval.router import RouterStats, plot_expert_load, plot_token_experts, router_trace

__all__ = ["RouterStats", "choice_logprobs", "evaluate", "extract_choice", "extract_number", "multiple_choice",
           "pass_at_k", "perplexity", "plot_expert_load", "plot_token_experts", "read_texts", "router_trace",
           "token_logprobs"]
