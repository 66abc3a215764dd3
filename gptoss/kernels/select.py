"""Which kernels a model's matmuls use: a static option of the model (`GptOss(..., kernels=...)`), never global state.

* `"auto"` (default): on the CPU of an x86-64 machine, the CPU kernels of the shared library (MXFP4 experts,
  decode-sized bf16 projections) when it loads, else the pure-XLA paths with one warning; on a GPU, the Pallas
  kernels (MXFP4 experts, flash attention) when they compile there, else the pure-XLA paths with one warning; on
  TPU and other CPUs, the pure-XLA paths.
* `"xla"`: the pure-XLA paths everywhere (the reference twins of the kernels).
* `"cpu"`: the CPU kernels, and an error if they cannot run here.
* `"pallas"`: the Pallas kernels (written for the Triton lowering); on a CPU they run in Pallas' interpret mode,
  which is for tests: slow.

The environment variable `GPTOSS_KERNELS` only supplies the default for models built without an explicit choice
(for benchmarks); it is read when the model is built, and the model shows the value it got.
"""

from __future__ import annotations

import os
import platform
import threading
import warnings

import jax

from gptoss.kernels import mxfp4_cpu

KERNELS = ("auto", "xla", "cpu", "pallas")
ENV = "GPTOSS_KERNELS"

_lock = threading.Lock()
_warned = {"done": False}


class KernelUnavailableWarning(RuntimeWarning):
    """The kernels for this backend could not be loaded or compiled; gptoss runs the (slower) pure-XLA paths."""


def check_kernels(kernels: str) -> str:
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
    return kernels


def default_kernels() -> str:
    """The choice for a model built without one: $GPTOSS_KERNELS, else "auto"."""
    value = os.environ.get(ENV, "").strip().lower() or "auto"
    if value not in KERNELS:
        raise ValueError(f"{ENV} must be one of {KERNELS}, got {value!r}")
    return value


def _x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def cpu_kernels(kernels: str) -> bool:
    """Whether code traced now for a model with this `kernels` option runs the CPU kernels."""
    check_kernels(kernels)
    if kernels in ("xla", "pallas"):
        return False
    on_cpu = jax.default_backend() == "cpu"
    if kernels == "cpu":
        if not on_cpu:
            raise RuntimeError(f"kernels='cpu' but JAX's default backend is {jax.default_backend()!r}; "
                               "use kernels='auto' or 'xla'")
        if not mxfp4_cpu.kernel_available():
            raise RuntimeError(f"kernels='cpu' but the CPU kernels are unavailable: {mxfp4_cpu.load_error()}")
        return True
    if not (on_cpu and _x86()):
        return False
    if mxfp4_cpu.kernel_available():
        return True
    with _lock:
        first, _warned["done"] = not _warned["done"], True
    if first:
        warnings.warn(f"gptoss: the CPU kernels are unavailable ({mxfp4_cpu.load_error()}); using the pure-XLA paths, "
                      "two orders of magnitude slower on MXFP4 expert matmuls. Reinstall with a C++ compiler present "
                      "(`pip install -e .`), or build the model with kernels='xla' to choose them.",
                      KernelUnavailableWarning, stacklevel=2)
    return False


def pallas_kernels(kernels: str) -> bool:
    """Whether code traced now for a model with this `kernels` option runs the Pallas kernels."""
    check_kernels(kernels)
    backend = jax.default_backend()
    if kernels == "pallas":
        if backend == "tpu":
            raise RuntimeError("kernels='pallas': gptoss's Pallas kernels are written for GPUs (Triton); on TPU use "
                               "kernels='auto' or 'xla'")
        return True
    if kernels != "auto" or backend != "gpu":
        return False
    ok, error = pallas_compiles()
    if ok:
        return True
    with _lock:
        first, _warned["pallas"] = not _warned.get("pallas"), True
    if first:
        warnings.warn(f"gptoss: the Pallas GPU kernels do not compile here ({error}); using the pure-XLA paths "
                      "(slower MXFP4 experts, attention without a flash kernel). kernels='xla' chooses them quietly.",
                      KernelUnavailableWarning, stacklevel=2)
    return False


_probe: dict = {}


def pallas_compiles() -> tuple[bool, str | None]:
    """Compiles each Pallas kernel once at a small size for the default backend: (ok, first error)."""
    with _lock:
        if "result" not in _probe:
            _probe["result"] = _compile_probe()
        return _probe["result"]


def _compile_probe() -> tuple[bool, str | None]:
    import jax.numpy as jnp

    from gptoss.kernels.attention_pallas import flash_attend_pallas
    from gptoss.kernels.mxfp4_pallas import mx_gather_pallas, mx_grouped_pallas
    from gptoss.quant.mxfp4 import MXFP4Array

    E, N, K, M = 4, 64, 64, 32
    w = MXFP4Array(jnp.zeros((E, N, K // 32, 16), jnp.uint8), jnp.full((E, N, K // 32), 127, jnp.uint8),
                   jnp.bfloat16)
    x = jnp.zeros((M, K), jnp.bfloat16)
    q, kv = jnp.zeros((1, 64, 8, 64), jnp.bfloat16), jnp.zeros((1, 64, 2, 64), jnp.bfloat16)
    pos = jnp.arange(64)[None]
    probes = {
        "mx_gather": lambda: mx_gather_pallas(x, w, jnp.zeros((M, 2), jnp.int32)),
        "mx_grouped": lambda: mx_grouped_pallas(x, w, jnp.array([M, 0, 0, 0], jnp.int32)),
        "flash_attention": lambda: flash_attend_pallas(q, kv, kv, jnp.zeros((8,)), pos, pos, window=16, scale=0.125),
    }
    for name, fn in probes.items():
        try:
            jax.jit(fn).lower().compile()
        except Exception as e:  # noqa: BLE001 - any lowering failure means: use XLA
            return False, f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    return True, None
