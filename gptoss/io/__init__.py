"""Checkpoint I/O: key maps, tensor-by-tensor loading, streaming HF-layout saving."""

from gptoss.config import DEMO_DIR, local_folder
from gptoss.io.load import from_pretrained, open_checkpoint
from gptoss.io.safetensors_io import CheckpointError
from gptoss.io.save import save_pretrained

__all__ = ["DEMO_DIR", "CheckpointError", "from_pretrained", "local_folder", "open_checkpoint", "save_pretrained"]
