"""Which kernels a model's matmuls use: a static option of the model (`GptOss(..., kernels=...)`), never global state.

* `"auto"` (default): the CPU kernels of the shared library (MXFP4 experts, decode-sized bf16 projections) when
  JAX's default backend is the CPU of an x86-64 machine and the library loads; otherwise the pure-XLA paths (GPU,
  TPU, other CPUs), with one warning if an x86-64 CPU lacks the library.
* `"xla"`: the pure-XLA paths everywhere (the reference twins of the kernels).
* `"cpu"`: the CPU kernels, and an error if they cannot run here.

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

KERNELS = ("auto", "xla", "cpu")
ENV = "GPTOSS_KERNELS"

_lock = threading.Lock()
_warned = {"done": False}


class KernelUnavailableWarning(RuntimeWarning):
    """The CPU kernels could not be loaded; gptoss runs the (much slower) pure-XLA paths."""


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
    if kernels == "xla":
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
