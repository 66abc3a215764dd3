"""`random_model`: a GptOss with every parameter random, drawn with numpy leaf by leaf and placed on the default
device (no initializer runs, nothing compiles), for tests, benchmarks and the demo. The one builder of synthetic
models."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptoss.config import ModelConfig
from gptoss.model.gpt_oss import GptOss
from gptoss.quant import MXFP4Array

E2M1_RMS = math.sqrt(68.5 / 8)  # rms of the 8 E2M1 magnitudes: uniformly random codes times 2**(s-127)


def random_model(cfg: ModelConfig, *, dtype: Any = jnp.float32, experts: str = "mxfp4", seed: int = 0,
                 bias_std: float = 0.3, **options) -> GptOss:
    """Matrices ~ N(0, 1/fan_in) (embeddings N(0, 1)); biases and sinks ~ N(0, bias_std); norm gains 1 + N(0, 0.2)
    (so that a dropped, swapped or transposed tensor shows); packed experts get uniformly random codes with scale
    bytes spread around the same 1/sqrt(fan_in) rms. `options` go to GptOss (moe_impl, kernels)."""
    abstract = nnx.eval_shape(lambda: GptOss(cfg, dtype=dtype, experts=experts, **options))
    graphdef, state = nnx.split(abstract)
    for i, (path, var) in enumerate(nnx.to_flat_state(state)):
        var.set_value(_draw(_spec(path, var.get_value(), bias_std), np.random.default_rng([seed, i])))
    return nnx.merge(graphdef, state)


def _spec(path, value, bias_std: float) -> tuple:
    """(kind, shape, dtype, a, b): how one parameter is drawn."""
    name = str(path[-1])
    if isinstance(value, MXFP4Array):
        center = round(127 + math.log2(value.shape[-1] ** -0.5 / E2M1_RMS))
        return ("mxfp4", tuple(value.blocks.shape), jnp.dtype(value.dtype).name, center, 0.0)
    shape, dt = tuple(value.shape), jnp.dtype(value.dtype).name
    if name == "scale_D":
        return ("normal", shape, dt, 0.2, 1.0)
    if name.startswith(("b", "sinks")) or "bias" in name:
        return ("normal", shape, dt, bias_std, 0.0)
    if name == "embed_VD":
        return ("normal", shape, dt, 1.0, 0.0)
    return ("normal", shape, dt, _fan_in(name, shape) ** -0.5, 0.0)


def _fan_in(name: str, shape: tuple[int, ...]) -> int:
    """The contracted size of a matrix named with shape suffixes (wq_NHD contracts D; wo_DNH contracts N and H)."""
    if name == "wo_DNH":
        return shape[1] * shape[2]
    return shape[-1]  # [out, in] layouts: wq_NHD, wk/wv_KHD, unembed_VD, router_ED, gate_up_EFD, down_EDI


def _draw(spec: tuple, rng: np.random.Generator):
    kind, shape, dtype, a, b = spec
    if kind == "mxfp4":
        blocks = rng.integers(0, 256, shape, dtype=np.uint8)
        scales = rng.integers(a - 2, a + 3, shape[:-1], dtype=np.uint8)
        return MXFP4Array(jax.device_put(blocks), jax.device_put(scales), jnp.dtype(dtype))
    values = rng.standard_normal(shape, dtype=np.float32)
    values *= a
    values += b
    return jax.device_put(values.astype(jnp.dtype(dtype)))
