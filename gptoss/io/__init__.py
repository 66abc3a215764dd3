"""Checkpoint I/O: key maps, tensor-by-tensor loading, streaming HF-layout saving."""

from gptoss.io.load import from_pretrained, open_checkpoint
from gptoss.io.safetensors_io import CheckpointError
from gptoss.io.save import save_pretrained

__all__ = ["CheckpointError", "from_pretrained", "open_checkpoint", "save_pretrained"]
