"""Export a trained model in the Hugging Face layout: adapters merged, experts written as MXFP4 (re-quantized
with the core quantizer, the OCP MX rules) or dense. The model in memory keeps its adapters."""

from __future__ import annotations

from flax import nnx

from gptoss.io import save_pretrained
from gptoss.train.lora import merge_lora


def export_pretrained(model, path, *, experts: str = "mxfp4", **save_options) -> str:
    """Writes `model` with its adapters merged to `path` (transformers and gptoss.from_pretrained load it).
    experts="mxfp4": dense (or merged) experts are quantized, lossy; "dense": exact in the model dtype."""
    merged = merge_lora(nnx.clone(model)) if nnx.state(model, nnx.LoRAParam) else model
    return save_pretrained(merged, path, experts=experts, **save_options)
