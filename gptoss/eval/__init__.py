"""Evaluation: likelihoods (perplexity, bits per byte, multiple choice)."""

from gptoss.eval.likelihood import choice_logprobs, multiple_choice, perplexity, read_texts, token_logprobs

__all__ = ["choice_logprobs", "multiple_choice", "perplexity", "read_texts", "token_logprobs"]
