"""`save_pretrained`: our model -> HF layout that transformers loads (sharded, with index)."""

from __future__ import annotations

import json
import os
import re
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptoss.io.keymap import QUANTIZATION_CONFIG, hf_entries
from gptoss.io.safetensors_io import DTYPES, NAMES, write_file
from gptoss.quant import MXFP4Array, quantize
from gptoss.quant.bf12 import BF12Array
from gptoss.tokenizer import save_tokenizer_info

DEFAULT_SHARD_BYTES = 5 * 1024**3
_OUR_FILES = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$")


def save_pretrained(model, path: str | os.PathLike, *, experts: str = "mxfp4",
                    max_shard_bytes: int = DEFAULT_SHARD_BYTES, tokenizer=None) -> str:
    """Writes config.json and model*.safetensors (+ index when sharded) in the transformers layout.

    experts="mxfp4" writes `*_blocks`/`*_scales` (quantizing dense experts, lossy); "dense" writes
    transformers' dense [E, in, out] experts in the model dtype. Files are written under temporary names
    and renamed at the end, so an interrupted save never leaves a half-written checkpoint behind. `tokenizer` (a
    tokenizer or its name) is recorded in gptoss_tokenizer.json, so `load_tokenizer(path)` finds it (a model with
    the byte-level vocabulary would otherwise get o200k).
    """
    if experts not in ("mxfp4", "dense"):
        raise ValueError(f"experts must be 'mxfp4' or 'dense', got {experts!r}")
    cfg = model.config
    if experts == "mxfp4":
        cfg.check_mxfp4()
    adapters = [".".join(map(str, k)) for k, _ in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))]
    if adapters:  # the HF layout has no place for them: saving would silently drop the training
        raise ValueError(f"the model has {len(adapters)} adapter tensors ({adapters[0]}, ...): merge them with "
                         "gptoss.train.export_pretrained (or merge_lora), or save them with gptoss.train.save_adapters")
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    tensors = []
    for entry in hf_entries(cfg, experts):
        value = flat[entry.path].get_value()
        if entry.kind == "mxfp4":
            packed = value if isinstance(value, MXFP4Array) else _quantize(value)
            for name, arr in zip(entry.names, (packed.blocks, packed.scales)):
                tensors.append((name, "U8", tuple(arr.shape), lambda a=arr: np.asarray(a)))
        else:
            if isinstance(value, MXFP4Array):
                value = value.dequantize(model.dtype)
            elif isinstance(value, BF12Array):  # packed for decode (gptoss.pack_dense): its exact bf16 bits
                value = value.unpack()
            shape = tuple(entry.to_ckpt(np.empty(value.shape, np.bool_)).shape)
            code = NAMES[np.dtype(value.dtype)]
            tensors.append((entry.names[0], code, shape,
                            lambda v=value, f=entry.to_ckpt: np.asarray(f(np.asarray(v)))))

    shards, current, size = [], [], 0
    for t in tensors:
        nbytes = int(np.prod(t[2], dtype=np.int64)) * np.dtype(_np_dtype(t[1])).itemsize
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(t)
        size += nbytes
    shards.append(current)
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]

    config = cfg.to_hf()
    config["dtype"] = config["torch_dtype"] = jnp.dtype(model.dtype).name
    if experts == "mxfp4":
        config["quantization_config"] = dict(QUANTIZATION_CONFIG)
    staged = []
    with tempfile.TemporaryDirectory(dir=path, prefix=".saving-") as tmp:
        for name, shard in zip(names, shards):
            write_file(os.path.join(tmp, name), shard)
            staged.append(name)
        if n > 1:
            total = sum(int(np.prod(t[2], dtype=np.int64)) * np.dtype(_np_dtype(t[1])).itemsize for t in tensors)
            weight_map = {t[0]: name for name, shard in zip(names, shards) for t in shard}
            _write_json(os.path.join(tmp, "model.safetensors.index.json"),
                        {"metadata": {"total_size": total}, "weight_map": weight_map})
            staged.append("model.safetensors.index.json")
        _write_json(os.path.join(tmp, "config.json"), config)
        staged.append("config.json")
        # Stale shards of an earlier save would be picked up by loaders that glob; they are ours to replace.
        for old in os.listdir(path):
            if (_OUR_FILES.match(old) or old == "model.safetensors.index.json") and old not in staged:
                os.remove(os.path.join(path, old))
        for name in staged:
            os.replace(os.path.join(tmp, name), os.path.join(path, name))
    if tokenizer is not None:
        save_tokenizer_info(tokenizer, path)
    return path


def _quantize(dense) -> MXFP4Array:
    return jax.jit(quantize)(jnp.asarray(dense, jnp.float32))


def _np_dtype(code: str):
    return DTYPES[code]


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
