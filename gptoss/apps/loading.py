"""Model + tokenizer from a config: a checkpoint folder / hub id, or a random preset built on the fly."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile

import jax.numpy as jnp

from gptoss.config import ModelConfig
from gptoss.io import from_pretrained, local_folder, save_pretrained
from gptoss.kernels import mxfp4_cpu
from gptoss.kernels.select import KERNELS
from gptoss.layers import MOE_IMPLS
from gptoss.model import pack_dense, random_model
from gptoss.model.packing import DENSE_FORMATS
from gptoss.tokenizer import load_tokenizer, save_tokenizer_info

DTYPES = ("bfloat16", "float32")  # what a model computes in (norm gains stay fp32 either way)
# Random presets use the byte-level harmony tokenizer, so their vocabulary is small.
BYTES_VOCAB = 272


@dataclasses.dataclass
class ModelSpec:
    path: str | None = None  # checkpoint folder or hub id
    preset: str | None = None  # "tiny": a random model written to a temporary checkpoint and loaded back
    config: dict | None = None  # with a preset: ModelConfig fields that replace the tiny preset's
    dtype: str = "bfloat16"
    experts: str = "auto"  # keep the checkpoint's format; "mxfp4" / "dense" convert
    moe_impl: str = "auto"
    kernels: str | None = None  # "auto" | "xla" | "cpu" | "pallas"; None: $GPTOSS_KERNELS or "auto"
    # what the CPU kernels' decode GEMV multiplies: "x16" | "x8" | "exact" (mxfp4_cpu.set_gemv_input; process-wide);
    # None: $GPTOSS_MXFP4_GEMV_INPUT or x16
    gemv_input: str | None = None
    # attention's and the unembedding's weights: "bf16" as stored, "bf12" packed losslessly in 77 % of the bytes
    # (gptoss.pack_dense: faster CPU decode), "auto": bf12 where it pays (a bf16 model on a CPU that decodes it in
    # registers, without AMX), except when training
    dense_weights: str = "auto"
    seed: int = 0
    mesh: dict | None = None  # e.g. {data: 1, expert: 8, tensor: 1}: sharded over devices (gptoss.sharding)

    def __post_init__(self):
        if (self.path is None) == (self.preset is None):
            raise ValueError("model: set exactly one of 'path' (a checkpoint) or 'preset' (a random model)")
        if self.preset is not None and self.preset != "tiny":
            raise ValueError(f"model.preset: only 'tiny' can be built at random, got {self.preset!r} (a real "
                             "model is a checkpoint: model.path=FOLDER or a hub id)")
        choices = {"dtype": DTYPES, "experts": ("auto", "mxfp4", "dense"), "moe_impl": MOE_IMPLS,
                   "kernels": (None, *KERNELS), "gemv_input": (None, *mxfp4_cpu.GEMV_INPUTS),
                   "dense_weights": DENSE_FORMATS}
        for key, allowed in choices.items():
            value = getattr(self, key)
            if value not in allowed:
                raise ValueError(f"model.{key}: must be one of {[c for c in allowed if c is not None]}, got {value!r}")


def tiny_config(**overrides) -> ModelConfig:
    """The random preset's architecture (byte-level harmony vocabulary), with `overrides` of ModelConfig fields."""
    base = dict(vocab_size=BYTES_VOCAB, hidden_size=128, intermediate_size=96, num_hidden_layers=4, sliding_window=16,
                max_position_embeddings=1024, eos_token_id=None, pad_token_id=None)
    return ModelConfig.tiny(**{**base, **overrides})


def random_tiny_checkpoint(folder: str, seed: int = 0, config: dict | None = None) -> str:
    """Writes a random tiny gpt-oss (byte-level harmony vocabulary) in HF layout and records its tokenizer."""
    cfg = tiny_config(**(config or {}))
    save_pretrained(random_model(cfg, dtype=jnp.float32, experts="mxfp4", seed=seed), folder)
    save_tokenizer_info("harmony_bytes", folder)
    return folder


CHAT_FILE = "gptoss_chat.json"  # a checkpoint's chat defaults, e.g. {"system_message": false}


def chat_defaults(spec: ModelSpec) -> dict:
    """The checkpoint's own chat defaults (the demo model was trained without a system message)."""
    folder = local_folder(spec.path) if spec.path else None
    if folder and os.path.isfile(os.path.join(folder, CHAT_FILE)):
        with open(os.path.join(folder, CHAT_FILE)) as f:
            return json.load(f)
    return {}


def load_model_and_tokenizer(spec: ModelSpec, progress: bool = True, *, training: bool = False):
    """The model and its tokenizer. `training`: dense_weights "auto" keeps bf16 (packed weights are frozen)."""
    if spec.gemv_input is not None:
        if not mxfp4_cpu.kernel_available():
            raise ValueError(f"model.gemv_input={spec.gemv_input!r} sets gptoss's CPU kernels, which did not load: "
                             f"{mxfp4_cpu.load_error()}")
        mxfp4_cpu.set_gemv_input(spec.gemv_input)
    if spec.mesh is not None:  # multi-host runs start from the JAX_*/GPTOSS_* environment (else a no-op)
        from gptoss.sharding import init_distributed

        init_distributed()
    if spec.preset is not None:
        with tempfile.TemporaryDirectory(prefix="gptoss-tiny-") as folder:
            random_tiny_checkpoint(folder, spec.seed, spec.config)
            return _load(folder, spec, progress=False, training=training)
    return _load(spec.path, spec, progress, training)


def _load(path: str, spec: ModelSpec, progress: bool, training: bool):
    model = from_pretrained(path, dtype=spec.dtype, experts=spec.experts, moe_impl=spec.moe_impl,
                            kernels=spec.kernels, progress=progress, mesh=spec.mesh)
    if not (training and spec.dense_weights == "auto"):
        pack_dense(model, spec.dense_weights)
    folder = local_folder(path)
    tokenizer = load_tokenizer(folder if folder and os.path.isdir(folder) else None)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"{path}: tokenizer {tokenizer.name} has {tokenizer.vocab_size} ids but the model only "
                         f"{model.config.vocab_size}")
    return model, tokenizer
