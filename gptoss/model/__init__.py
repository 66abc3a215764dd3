"""The gpt-oss model."""

from gptoss.model.gpt_oss import Block, GptOss
from gptoss.model.random import random_model

__all__ = ["Block", "GptOss", "random_model"]
