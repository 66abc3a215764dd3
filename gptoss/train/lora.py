"""LoRA on a gpt-oss model: attention q/k/v/o and per-expert adapters on gate_up/down, added in place, saved and
loaded on their own (safetensors + a small JSON config), merged into the weights.

The base stays as it is: packed MXFP4 experts are `QuantWeight`s, not parameters, so training the adapters
(`nnx.LoRAParam`) never touches their bytes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptoss.layers.lora import ATTENTION_TARGETS, check_dropout, check_rank
from gptoss.layers.moe import ExpertLoRA
from gptoss.quant import MXFP4Array
from gptoss.quant.bf12 import BF12Array

TARGETS = (*ATTENTION_TARGETS, "experts")
ADAPTER_CONFIG = "gptoss_adapter.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank, alpha (scale = alpha / rank), dropout on each adapter's input while training; targets among q, k, v,
    o, experts; layers (default all) and experts (default all) that get adapters."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = TARGETS
    layers: tuple[int, ...] | None = None
    experts: tuple[int, ...] | None = None

    def __post_init__(self):
        check_rank(self.rank)
        object.__setattr__(self, "dropout", check_dropout(self.dropout))
        object.__setattr__(self, "targets", tuple(self.targets))
        bad = set(self.targets) - set(TARGETS)
        if bad or not self.targets:
            raise ValueError(f"LoRA targets must be a non-empty subset of {TARGETS}, got {self.targets}")
        for name in ("layers", "experts"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(int(v) for v in value))


def add_lora(model, cfg: LoraConfig, *, seed: int = 0):
    """Adds adapters to `model` in place (a fresh adapter changes no output); returns the model."""
    n = model.config.num_hidden_layers
    layers = range(n) if cfg.layers is None else cfg.layers
    bad = [i for i in layers if not 0 <= i < n]
    if bad:
        raise ValueError(f"LoRA layers {bad} do not exist (the model has {n} layers)")
    rngs = nnx.Rngs(seed)
    attn_targets = tuple(t for t in cfg.targets if t != "experts")
    for i in layers:
        block = model.layers[i]
        if attn_targets:
            block.attn.add_adapters(attn_targets, cfg.rank, cfg.alpha, rngs=rngs, dropout=cfg.dropout)
        if "experts" in cfg.targets:
            block.mlp.adapters = ExpertLoRA(model.config, cfg.rank, cfg.alpha, dtype=model.dtype, rngs=rngs,
                                            experts=cfg.experts, dropout=cfg.dropout)
    if model.layout is not None:
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
            var.set_value(model.layout.place_value(var.get_value(), path))
    return model


def set_dropout_keys(model, key) -> bool:
    """Gives every adapter with dropout its own key derived from `key` (inside a training step's trace, on the
    model merged there); returns whether any adapter has dropout."""
    any_dropout = False
    for i, block in enumerate(model.layers):
        for j, lora in enumerate((block.attn.adapters, block.mlp.adapters)):
            if lora is not None and lora.dropout > 0.0:
                lora.dropout_key = nnx.data(jax.random.fold_in(key, 2 * i + j))
                any_dropout = True
    return any_dropout


def lora_params(model) -> nnx.State:
    return nnx.state(model, nnx.LoRAParam)


def save_adapters(model, path, cfg: LoraConfig) -> Path:
    """Writes the adapters (safetensors, names = NNX state paths) and their config to the folder `path`."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {".".join(map(str, k)): np.asarray(jax.device_get(v.get_value()).astype(np.float32))
               for k, v in nnx.to_flat_state(lora_params(model))}
    if not tensors:
        raise ValueError("the model has no adapters to save (add_lora first)")
    tmp = path / (ADAPTER_WEIGHTS + ".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(path / ADAPTER_WEIGHTS)
    (path / ADAPTER_CONFIG).write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    return path


def load_adapters(model, path, *, strict: bool = True):
    """Adds the adapters saved in `path` to `model` (which must not have adapters yet); returns the model."""
    from safetensors.numpy import load_file

    path = Path(path)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name}: no such adapter file")
    raw = json.loads((path / ADAPTER_CONFIG).read_text())
    cfg = LoraConfig(**raw)
    add_lora(model, cfg)
    tensors = load_file(str(path / ADAPTER_WEIGHTS))
    state = nnx.to_flat_state(lora_params(model))
    expected = {".".join(map(str, k)): v for k, v in state}
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if strict and (missing or unexpected):
        raise ValueError(f"{path / ADAPTER_WEIGHTS}: adapters do not match the model "
                         f"(missing {missing[:4]}, unexpected {unexpected[:4]})")
    for name, var in expected.items():
        value = tensors[name]
        if value.shape != var.get_value().shape:
            raise ValueError(f"{path / ADAPTER_WEIGHTS}: tensor {name} has shape {value.shape}, the model expects "
                             f"{var.get_value().shape}")
        new = jnp.asarray(value, var.get_value().dtype)
        var.set_value(new if model.layout is None else model.layout.place_value(new, tuple(name.split("."))))
    return model


def merge_lora(model):
    """Folds every adapter into its weight and removes it; returns the model. Packed MXFP4 experts that have
    adapters become dense (exact: dequantize + delta); quantize them again at export
    (`save_pretrained(..., experts="mxfp4")`)."""
    has_expert_adapters = any(b.mlp.adapters is not None for b in model.layers)
    if has_expert_adapters and model.experts == "mxfp4":
        for block in model.layers:
            for name in ("gate_up_EFD", "down_EDI"):
                packed = getattr(block.mlp, name)[...]
                dense = packed.dequantize(model.dtype) if isinstance(packed, MXFP4Array) else packed
                setattr(block.mlp, name, nnx.Param(dense))
        model.experts = "dense"
    weights = {"q": "wq_NHD", "k": "wk_KHD", "v": "wv_KHD", "o": "wo_DNH"}
    for block in model.layers:
        ad = block.attn.adapters
        if ad is not None:
            for target, wname in weights.items():
                delta = ad.delta(target)
                if delta is not None:
                    w = getattr(block.attn, wname)
                    if isinstance(w.get_value(), BF12Array):  # packed for decode: merged, it is a parameter again
                        w = nnx.Param(w.get_value().unpack())
                        setattr(block.attn, wname, w)
                    w.set_value((w.get_value().astype(jnp.float32) + delta).astype(w.get_value().dtype))
            block.attn.adapters = None
        if block.mlp.adapters is not None:
            d_gate_up, d_down = block.mlp.adapters.deltas()
            for wname, delta in (("gate_up_EFD", d_gate_up), ("down_EDI", d_down)):
                w = getattr(block.mlp, wname)
                w.set_value((w.get_value().astype(jnp.float32) + delta).astype(w.get_value().dtype))
            block.mlp.adapters = None
    return model
