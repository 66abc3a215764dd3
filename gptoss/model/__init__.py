"""The gpt-oss model."""

from gptoss.model.gpt_oss import Block, GptOss

__all__ = ["Block", "GptOss"]
