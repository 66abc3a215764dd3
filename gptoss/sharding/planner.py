"""Memory planner: per-device bytes of a gpt-oss model on a mesh, before anything is loaded.

Weights and KV cache are exact: the planner lays out every parameter and cache tensor with the same rules
and spec code the loader uses (sum of per-device shard sizes; tests check it against real sharded arrays).
The activation figure is an estimate of the transient peak of one forward pass of `prefill` tokens per row
(the engine prefills a prompt in one pass, so set `prefill` to the longest prompt) and of a decode step.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Mapping

import numpy as np

from gptoss.config import ModelConfig
from gptoss.layers.attention import uses_flash
from gptoss.layers.flash import BLOCK_K, BLOCK_Q
from gptoss.sharding.rules import CACHE_AXES, PACKED, PARAM_AXES, Rules, param_spec_for, resolve, spec_for

GiB = 1024**3
MiB = 1024**2
# Memory a framework sees per device (nvidia-smi totals for GPUs; HBM per chip for TPUs).
DEVICES: dict[str, int] = {
    "l4-24gb": 23034 * MiB,
    "a100-40gb": 40960 * MiB,
    "a100-80gb": 81920 * MiB,
    "h100-80gb": 81559 * MiB,
    "h200-141gb": 143771 * MiB,
    "b200-180gb": 183359 * MiB,
    "mi300x-192gb": 196592 * MiB,
    "tpu-v4-32gb": 32 * GiB,
    "tpu-v5e-16gb": 16 * GiB,
    "tpu-v5p-95gb": 95 * GiB,
    "tpu-v6e-32gb": 32 * GiB,
}
ALIASES = {"l4": "l4-24gb", "a100": "a100-80gb", "h100": "h100-80gb", "h200": "h200-141gb", "b200": "b200-180gb",
           "mi300x": "mi300x-192gb", "v4": "tpu-v4-32gb", "v5e": "tpu-v5e-16gb", "v5p": "tpu-v5p-95gb",
           "v6e": "tpu-v6e-32gb", "tpu-v4": "tpu-v4-32gb", "tpu-v5e": "tpu-v5e-16gb", "tpu-v5p": "tpu-v5p-95gb",
           "tpu-v6e": "tpu-v6e-32gb"}
USABLE = 0.92  # share of a device's memory a plan may fill (runtime, compiled code, fragmentation)
DEFAULT_PREFILL = 2048


def device_memory(name: str) -> int:
    key = name.lower()
    key = ALIASES.get(key, key)
    if key not in DEVICES:
        raise ValueError(f"unknown device {name!r}; known: {sorted(DEVICES)} (or aliases {sorted(ALIASES)})")
    return DEVICES[key]


@dataclasses.dataclass
class Plan:
    model: str
    mesh: dict[str, int]
    batch: int
    context: int
    prefill: int
    expert_bytes: int  # per device: expert matrices (MXFP4 blocks+scales, or dense)
    dense_bytes: int  # per device: everything else (attention, embeddings, router, biases, norms)
    kv_cache_bytes: int  # per device
    activation_bytes: int  # per device, estimated transient peak: max of the two below
    prefill_activation_bytes: int = 0  # one forward of `prefill` tokens per row (attention over all slots)
    decode_activation_bytes: int = 0  # one decode step
    notes: tuple[str, ...] = ()

    @property
    def devices(self) -> int:
        return math.prod(self.mesh.values()) if self.mesh else 1

    @property
    def weight_bytes(self) -> int:
        return self.expert_bytes + self.dense_bytes

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_cache_bytes + self.activation_bytes

    def fits(self, device: str) -> bool:
        return self.total_bytes <= USABLE * device_memory(device)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(devices=self.devices, weight_bytes=self.weight_bytes, total_bytes=self.total_bytes,
                 fits={name: self.fits(name) for name in DEVICES})
        return d

    def table(self, devices: list[str] | None = None) -> str:
        rows = [("packed experts", self.expert_bytes), ("bf16 parts", self.dense_bytes),
                ("KV cache", self.kv_cache_bytes), ("activations, decode", self.decode_activation_bytes),
                (f"activations, prefill {self.prefill}", self.prefill_activation_bytes),
                ("total", self.total_bytes)]
        mesh = " x ".join(f"{a}={n}" for a, n in self.mesh.items()) or "1 device"
        lines = [f"{self.model} on {mesh} ({self.devices} device(s)), per device",
                 f"  assumed: batch {self.batch} row(s) (--batch), KV cache for {self.context:,} tokens per row "
                 f"(--context), prompts prefilled {self.prefill:,} tokens per forward (--prefill)",
                 *(f"  {name:<26} {n / GiB:10.2f} GiB" for name, n in rows)]
        for dev in devices or sorted(DEVICES, key=DEVICES.get):
            cap = device_memory(dev)
            verdict = "fits" if self.fits(dev) else "does NOT fit"
            lines.append(f"  {dev:<26} {cap / GiB:10.1f} GiB  {verdict} ({self.total_bytes / cap:.0%} used)")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def resolve_model(model: str | ModelConfig) -> tuple[str, ModelConfig]:
    if isinstance(model, ModelConfig):
        return "model", model
    if os.path.isdir(model):  # a checkpoint folder: its config only (HF layout, else original/)
        name = os.path.basename(os.path.normpath(model))
        if os.path.exists(os.path.join(model, "config.json")):
            return name, ModelConfig.from_hf(os.path.join(model, "config.json"))
        return name, ModelConfig.from_original(os.path.join(model, "original", "config.json"))
    return model, ModelConfig.preset(model)


def parse_mesh(text: str | Mapping[str, int] | None) -> dict[str, int]:
    """"expert=8" / "data=2,expert=4" / {"expert": 8} -> {"expert": 8}."""
    if text is None:
        return {}
    if isinstance(text, Mapping):
        return {str(k): int(v) for k, v in text.items()}
    if hasattr(text, "shape") and hasattr(text, "axis_names"):  # a jax Mesh
        return dict(text.shape)
    out = {}
    for part in str(text).replace(" ", ",").split(","):
        if not part:
            continue
        name, sep, value = part.partition("=")
        if not sep or not value.strip().isdigit():
            raise ValueError(f"mesh {text!r}: expected axis=size pairs like 'data=2,expert=4', got {part!r}")
        out[name.strip()] = int(value)
    return out


@functools.lru_cache(maxsize=32)
def param_shapes(cfg: ModelConfig, dtype: str, experts: str) -> tuple[tuple[tuple, tuple, str, int], ...]:
    """(path, shape, dtype, count) of every parameter array: blocks and scales for MXFP4 (count = layers)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from gptoss.model import GptOss
    from gptoss.quant import MXFP4Array

    one = cfg.replace(num_hidden_layers=1, layer_types=cfg.layer_types[:1])  # every layer has the same params
    abstract = nnx.eval_shape(lambda: GptOss(one, dtype=jnp.dtype(dtype), experts=experts))
    out = []
    for path, var in nnx.to_flat_state(nnx.state(abstract)):
        value = var.get_value()
        count = cfg.num_hidden_layers if path[0] == "layers" else 1
        arrays = (value.blocks, value.scales) if isinstance(value, MXFP4Array) else (value,)
        for arr in arrays:
            assert isinstance(arr, jax.ShapeDtypeStruct)
            out.append((tuple(path), tuple(arr.shape), np.dtype(arr.dtype).name, count))
    return tuple(out)


def shard_bytes(shape, dtype, spec, sizes: Mapping[str, int]) -> int:
    n = np.dtype(dtype).itemsize
    for dim, part in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        axes = () if part is None else (part,) if isinstance(part, str) else tuple(part)
        n *= dim // math.prod(sizes[a] for a in axes)
    return n


def plan(model: str | ModelConfig = "gpt-oss-120b", mesh=None, *, context: int = 131072, batch: int = 1,
         prefill: int | None = None, dtype: str = "bfloat16", experts: str = "mxfp4", cache_dtype: str | None = None,
         rules: Rules | Mapping | None = None) -> Plan:
    """Per-device memory of `model` (preset name, checkpoint folder or ModelConfig) on `mesh` (a dict, a
    "data=2,expert=4" string or a Mesh) for `batch` rows of `context` tokens (cache slots)."""
    name, cfg = resolve_model(model)
    sizes = parse_mesh(mesh)
    if context < 1 or batch < 1:
        raise ValueError(f"context and batch must be positive, got context={context}, batch={batch}")
    prefill = min(context, DEFAULT_PREFILL) if prefill is None else prefill
    rules, notes = resolve(cfg, sizes, rules, experts)
    expert_b = dense_b = 0
    replicated: dict[str, set] = {}
    for path, shape, dt, count in param_shapes(cfg, np.dtype(dtype).name, experts):
        spec = param_spec_for(PARAM_AXES[path[-1]], shape, sizes, rules, ".".join(map(str, path)))
        _note_replicated(replicated, path[-1], PARAM_AXES[path[-1]], shape, spec, sizes, rules)
        b = count * shard_bytes(shape, dt, spec, sizes)
        if path[-1] in PACKED:
            expert_b += b
        else:
            dense_b += b
    cache_dt = np.dtype(cache_dtype or dtype)
    cache_b = 0
    for layer in range(cfg.num_hidden_layers):
        slots = cfg.sliding_window if cfg.is_sliding(layer) else context
        kv = (batch, slots, cfg.num_key_value_heads, cfg.head_dim)
        for key, shape, dt in (("k_BSKH", kv, cache_dt), ("v_BSKH", kv, cache_dt), ("pos_BS", kv[:2], np.int32)):
            spec = spec_for(CACHE_AXES[key], shape, sizes, rules, key)
            _note_replicated(replicated, "KV cache", CACHE_AXES[key], shape, spec, sizes, rules)
            cache_b += shard_bytes(shape, dt, spec, sizes)
    pre = activation_estimate(cfg, sizes, rules, batch, context, prefill, np.dtype(dtype).itemsize)
    dec = activation_estimate(cfg, sizes, rules, batch, context, 1, np.dtype(dtype).itemsize)
    notes = list(notes)
    for (logical, n, axes), names in sorted(replicated.items()):
        notes.append(f"warning: {logical} = {n} does not divide over mesh axes {axes}: "
                     f"{', '.join(sorted(names))} replicated over them (more memory per device)")
    if pre > 4 * (expert_b + dense_b):
        notes.append("the prefill estimate is several times the weights: the MoE's fp32 buffers of every "
                     "(token, expert) pair; prefill in shorter chunks (--prefill), or split experts over more "
                     "devices")
    return Plan(name, sizes, batch, context, prefill, expert_b, dense_b, cache_b, max(pre, dec), pre, dec,
                tuple(notes))


def _note_replicated(out: dict, name: str, logical, shape, spec, sizes, rules: Rules) -> None:
    """Records the dims that the rules would shard but that fall back to replication (they do not divide)."""
    parts = tuple(spec) + (None,) * (len(shape) - len(spec))
    for ax, n, part in zip(logical, shape, parts):
        want = tuple(a for a in rules.axes(ax) if sizes.get(a, 1) > 1)
        got = () if part is None else (part,) if isinstance(part, str) else tuple(part)
        missing = tuple(a for a in want if a not in got)
        if missing:
            out.setdefault((ax, n, missing), set()).add(name)


def activation_estimate(cfg: ModelConfig, sizes, rules: Rules, batch: int, context: int, prefill: int,
                        itemsize: int) -> int:
    """Transient peak of the largest single layer in one forward of `prefill` tokens per row (1 = a decode
    step) with a cache of `context` slots: attention or the MoE (the dequantized experts of the local strategy,
    fp32 buffers of the pairs), plus the residual stream and the last-token logits. Attention follows the XLA
    path the engine takes (gptoss.layers.attention.uses_flash): fp32 scores over every key for short chunks and
    caches (an upper bound: the unrolled blocks hold 0.3-0.55x of it), else the attend_flash loop, whose scores
    are one block's."""
    def split(logical: str, n: int) -> int:
        axes = [a for a in rules.axes(logical) if sizes.get(a, 1) > 1]
        d = math.prod(sizes[a] for a in axes)
        return n // d if d and n % d == 0 else n

    B = split("batch", batch)
    N, K = split("heads", cfg.num_attention_heads), split("kv_heads", cfg.num_key_value_heads)
    D, H, I = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    F = split("expert_ffn", I)  # per device intermediate units
    E = split("experts", cfg.num_experts)
    T = prefill
    S = context + T if T > 1 else context  # a chunk attends to the cache and to itself
    if uses_flash(T, S):  # one block of scores, exp and mask (fp32); the output and a transposed copy of k/v
        attention = 3 * B * N * BLOCK_Q * BLOCK_K * 4 + 3 * B * T * N * H * 4 + 2 * B * S * K * H * itemsize * 2
    else:  # logits and probabilities (fp32), fp32 copies of k/v (+ the chunk's concat)
        attention = 2 * B * N * T * S * 4 + 2 * B * S * K * H * (4 + (itemsize if T > 1 else 0))
    A = B * T * cfg.experts_per_token  # token-expert pairs (every expert shard computes them all, masked)
    if A < E:  # gather: one dequantized expert per pair
        moe = A * 3 * F * D * itemsize + A * 3 * F * 4
    else:  # grouped: one dequantized expert at a time, fp32 buffers of the pairs
        moe = 3 * F * D * itemsize + A * (D * 4 * 3 + 3 * F * 4)
    resid = 6 * B * T * D * 4
    logits = B * split("vocab", cfg.vocab_size) * 4 * 2
    peak = max(attention, moe) + resid + logits
    return int(peak)


def main(args) -> int:
    """`gptoss plan` (args: model, mesh, context, batch, prefill, dtype, experts, device, json)."""
    import json

    p = plan(args.model, args.mesh, context=args.context, batch=args.batch, prefill=args.prefill,
             dtype=args.dtype, experts=args.experts)
    devices = [ALIASES.get(d.lower(), d.lower()) for d in (args.device or [])] or None
    for d in devices or []:
        device_memory(d)
    if args.json:
        print(json.dumps(p.to_dict(), indent=2))
    else:
        print(p.table(devices))
    return 0 if not devices or all(p.fits(d) for d in devices) else 1
