"""The gpt-oss model."""

from gptoss.model.gpt_oss import Block, GptOss
from gptoss.model.packing import pack_dense, unpack_dense
from gptoss.model.random import random_model

__all__ = ["Block", "GptOss", "pack_dense", "random_model", "unpack_dense"]
