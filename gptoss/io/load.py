"""`from_pretrained`: HF or `original/` checkpoints, tensor by tensor, MXFP4 experts kept packed."""

from __future__ import annotations

import glob
import json
import os
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptoss.config import ConfigError, ModelConfig, local_folder
from gptoss.io.keymap import HF_DENSE_MARKER, HF_PACKED_MARKER, Entry, hf_entries, original_entries
from gptoss.io.safetensors_io import CheckpointError, TensorIndex, aligned, find_nonfinite
from gptoss.layers import EXPERTS
from gptoss.model import GptOss
from gptoss.quant import MXFP4Array, dequantize, quantize

FLOAT_CODES = frozenset({"BF16", "F16", "F32", "F64"})
HUB_PATTERNS = ["config.json", "generation_config.json", "model*.safetensors", "model.safetensors.index.json",
                "tokenizer*", "special_tokens_map.json", "chat_template*"]


def from_pretrained(path: str | os.PathLike, *, dtype: Any = "bfloat16", experts: str = "auto",
                    moe_impl: str = "auto", kernels: str | None = None, checkpoint_layout: str = "auto",
                    check_finite: bool = True, progress: bool = True, revision: str | None = None,
                    place: Callable[[Any, tuple], Any] | None = None, mesh: Any = None) -> GptOss:
    """Loads a gpt-oss checkpoint folder (HF layout, or `original/`) or a hub id into a `GptOss`.

    experts="auto" keeps the checkpoint's own format: packed MXFP4 experts stay packed (never dequantized at
    load), dense ones stay dense and exact. "mxfp4" quantizes dense experts (lossy, with a warning); "dense"
    dequantizes packed ones exactly into `dtype`. `moe_impl` and `kernels` are the model's run options (see
    GptOss). `checkpoint_layout` ("auto", "hf", "original") picks which files to read when a folder has both.
    `place(array, path)` puts each parameter on its device(s); the default is `jax.device_put`.
    `mesh` (a jax Mesh with axes data/expert/tensor, or a dict like {"expert": 8}) shards the model
    (gptoss.sharding): checked against the config before any weight is read, packed experts read from the
    mmapped file slice by slice, each device given only its slice.
    """
    if experts not in ("auto", *EXPERTS):
        raise ValueError(f"experts must be 'auto', 'mxfp4' or 'dense', got {experts!r}")
    dtype = jnp.dtype(dtype)
    root = _resolve(os.fspath(path), revision)
    kind, cfg, index, where = open_checkpoint(root, checkpoint_layout)
    if kind == "hf":
        packed = any(n.endswith(HF_PACKED_MARKER) for n in index.names())
        if not packed and not any(n.endswith(HF_DENSE_MARKER) for n in index.names()):
            raise CheckpointError(f"{where}: no expert tensors (neither *{HF_PACKED_MARKER} nor *{HF_DENSE_MARKER})")
        entries = hf_entries(cfg, "mxfp4" if packed else "dense")
    else:
        packed, entries = True, original_entries(cfg)
    cfg = _with_generation_stops(cfg, root if kind == "hf" else os.path.dirname(os.path.normpath(where)), root)
    if experts == "auto":
        experts = "mxfp4" if packed else "dense"
    _check_names(entries, index, cfg, where)
    sharding = None
    if mesh is not None:
        from gptoss.sharding import Layout

        sharding = Layout.create(mesh, cfg, experts=experts)  # validates before any weight is read
        place = place or sharding.place
    if experts == "mxfp4" and not packed:
        warnings.warn(f"{where} has dense experts; quantizing them to MXFP4 at load (lossy) because experts='mxfp4' "
                      "was asked for. Leave experts='auto' (or pass 'dense') to keep them exact.", stacklevel=2)

    abstract = nnx.eval_shape(lambda: GptOss(cfg, dtype=dtype, experts=experts, moe_impl=moe_impl, kernels=kernels,
                                             layout=sharding))
    graphdef, state = nnx.split(abstract)
    targets = dict(nnx.to_flat_state(state))
    place = place or (lambda x, _path: jax.device_put(x))
    total = sum(index.info(n).end - index.info(n).start for e in entries for n in set(e.names))
    if progress:  # (tqdm.auto warns in a notebook without ipywidgets: only when a bar is wanted)
        from tqdm.auto import tqdm
    else:
        from tqdm import tqdm

    with tqdm(total=total, unit="B", unit_scale=True, desc="loading", disable=not progress) as bar:
        for entry in entries:
            var = targets[entry.path]
            value = _convert(entry, [_read(index, n, s, check_finite, mmap=sharding is not None)
                                     for n, s in zip(entry.names, entry.shapes)], var.get_value(), index)
            if isinstance(value, MXFP4Array):
                value = MXFP4Array(place(value.blocks, entry.path), place(value.scales, entry.path), value.dtype)
            else:
                value = place(value, entry.path)
            var.set_value(value)
            bar.update(sum(index.info(n).end - index.info(n).start for n in set(entry.names)))
    return nnx.merge(graphdef, state)


def open_checkpoint(root: str, layout: str = "auto") -> tuple[str, ModelConfig, TensorIndex, str]:
    """Finds the checkpoint layout under `root`: ("hf" | "original", config, tensor index, folder)."""
    if layout not in ("auto", "hf", "original"):
        raise ValueError(f"checkpoint_layout must be 'auto', 'hf' or 'original', got {layout!r}")
    if not os.path.isdir(root):
        raise CheckpointError(f"{root}: not a folder")
    hf_files = _hf_files(root)
    if layout in ("auto", "hf") and hf_files:
        return "hf", ModelConfig.from_hf(os.path.join(root, "config.json")), TensorIndex(hf_files), root
    for folder in (os.path.join(root, "original"), root):
        files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
        cfg_path = os.path.join(folder, "config.json")
        if layout in ("auto", "original") and files and os.path.exists(cfg_path) and not _is_hf_config(cfg_path):
            return "original", ModelConfig.from_original(cfg_path), TensorIndex(files), folder
    found = sorted(os.listdir(root))[:20]
    raise CheckpointError(
        f"{root}: no gpt-oss checkpoint found (checkpoint_layout={layout!r}). Expected config.json with "
        f"model*.safetensors (HF layout) or original/config.json with original/*.safetensors; found {found}"
    )


def _with_generation_stops(cfg: ModelConfig, *folders: str) -> ModelConfig:
    """Adds the first generation_config.json's eos_token_id (the hub's gpt-oss lists <|return|>, <|endoftext|>
    and <|call|> there, config.json only <|return|>; an original/ folder's is in the snapshot above it) to the
    config's stop ids."""
    paths = [os.path.join(f, "generation_config.json") for f in folders]
    path = next((p for p in paths if os.path.exists(p)), None)
    if path is None:
        return cfg
    try:
        with open(path) as f:
            extra = json.load(f).get("eos_token_id")
    except (OSError, json.JSONDecodeError, AttributeError) as e:
        raise CheckpointError(f"{path}: cannot read generation config ({e})") from None
    if extra is None:
        return cfg
    ids = list(cfg.stop_token_ids)
    for t in extra if isinstance(extra, list) else [extra]:
        if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < cfg.vocab_size:
            raise CheckpointError(f"{path}: eos_token_id {t!r} is not a token id of this model "
                                  f"(vocab {cfg.vocab_size})")
        if t not in ids:
            ids.append(t)
    return cfg.replace(eos_token_id=tuple(ids))


def _hf_files(root: str) -> list[str]:
    cfg_path = os.path.join(root, "config.json")
    if not os.path.exists(cfg_path) or not _is_hf_config(cfg_path):
        return []
    index_path = os.path.join(root, "model.safetensors.index.json")
    if os.path.exists(index_path):
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index_path}: not a valid safetensors index ({e})") from None
        files = []
        for shard in sorted(set(weight_map.values())):
            full = os.path.join(root, shard)
            if not os.path.exists(full):
                names = [n for n, s in weight_map.items() if s == shard][:3]
                raise CheckpointError(
                    f"{index_path} lists shard {shard!r} (holding e.g. {names}) but the file is missing")
            files.append(full)
        return files
    return sorted(glob.glob(os.path.join(root, "model*.safetensors")))


def _is_hf_config(path: str) -> bool:
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read config ({e})") from None
    return "model_type" in d or "architectures" in d or "num_local_experts" in d


def _check_names(entries: list[Entry], index: TensorIndex, cfg: ModelConfig, where: str) -> None:
    expected = {n for e in entries for n in e.names}
    found = index.names()
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing:
        raise CheckpointError(f"{where}: {len(missing)} tensor(s) missing from the checkpoint, e.g. {missing[:5]}")
    if unexpected:
        hint = ""
        if any(".layers." in n or n.startswith("block.") for n in unexpected):
            hint = f" (config says num_hidden_layers={cfg.num_hidden_layers})"
        raise CheckpointError(f"{where}: {len(unexpected)} unexpected tensor(s), e.g. {unexpected[:5]}{hint}")


def _read(index: TensorIndex, name: str, shape: tuple[int, ...], check_finite: bool,
          mmap: bool = False) -> np.ndarray:
    info = index.info(name)
    if info.shape != shape:
        raise CheckpointError(f"{info.file}: tensor {name!r} has shape {list(info.shape)} but the config implies "
                              f"{list(shape)} (config.json contradicts the tensors?)")
    if mmap and info.dtype == "U8":  # packed experts on a mesh: devices copy only their slices out of the map
        return np.memmap(info.file, np.uint8, "r", offset=info.start, shape=info.shape)
    arr = index.read(name)
    if check_finite:
        bad = find_nonfinite(arr)
        if bad is not None:
            pos = tuple(int(i) for i in np.unravel_index(bad, arr.shape))
            raise CheckpointError(f"{info.file}: tensor {name!r} holds NaN/Inf (first at index {pos})")
    return arr


def _convert(entry: Entry, arrays: list[np.ndarray], target: Any, index: TensorIndex):
    """Checkpoint arrays -> the value of the model parameter, in the target's format and dtype."""
    if entry.kind == "mxfp4":
        blocks, scales = arrays
        for name, a in zip(entry.names, arrays):
            if a.dtype != np.uint8:
                raise CheckpointError(f"{index.info(name).file}: tensor {name!r} has dtype {a.dtype}, expected uint8 "
                                      "(MXFP4 blocks/scales)")
        if np.any(scales == 255):
            raise CheckpointError(f"{index.info(entry.names[1]).file}: tensor {entry.names[1]!r} holds scale byte "
                                  "255, which E8M0 reserves for NaN")
        if isinstance(target, MXFP4Array):
            return MXFP4Array(blocks, scales, target.dtype)
        return np.asarray(jax.jit(dequantize, static_argnums=2)(blocks, scales, target.dtype))
    (arr,) = arrays
    info = index.info(entry.names[0])
    if info.dtype not in FLOAT_CODES:
        raise CheckpointError(f"{info.file}: tensor {info.name!r} has dtype {info.dtype}, expected a float tensor ("
                              f"{', '.join(sorted(FLOAT_CODES))})")
    value = entry.to_model(arr)
    if isinstance(target, MXFP4Array):
        try:
            return jax.jit(quantize, static_argnums=1)(value.astype(np.float32), target.dtype)
        except ValueError as e:
            raise ConfigError(f"{entry.names[0]}: {e}") from None
    return aligned(value.astype(target.dtype, copy=False))




def _resolve(path: str, revision: str | None) -> str:
    local = local_folder(path)
    if local is not None:
        return local
    looks_like_repo = path.count("/") == 1 and not path.startswith((".", "/", "~"))
    if not looks_like_repo:
        raise CheckpointError(f"{path}: no such folder")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"{path!r} is not a local folder, and huggingface_hub is not installed to fetch it "
                              "from the hub (pip install 'gptoss[hub]', or pass a local folder)") from None
    try:
        return snapshot_download(path, revision=revision, allow_patterns=HUB_PATTERNS)
    except Exception as e:  # offline, unknown repo, gated, ...: all mean "give me a local folder"
        raise CheckpointError(f"could not fetch {path!r} from the Hugging Face hub ({type(e).__name__}: {e}); "
                              "download it yourself and pass the local folder") from e
