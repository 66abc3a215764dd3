"""The MXFP4 CPU kernel (csrc/mxfp4_matmul.cc) as a jit-able JAX op, and the switch that selects it.

`mx_gather_matmul(x [M, K], w [E, N, K] packed, idx [M, S]) -> [M, S, N] fp32` with
y[m, s] = W[idx[m, s]] . x[m], computed by an XLA FFI custom call that reads the packed MXFP4 bytes in place
(no dequantized copy). `grouped=True` buckets the (m, s) pairs by expert and streams each expert's weights
once for all of its rows (prefill); `grouped=False` is one GEMV per pair (decode). Same result either way.
Grouped calls with bf16 inputs use AMX tiles where the CPU has them (Sapphire Rapids and later): the weights are
dequantized exactly to bf16 (subnormal weights, |w| < 2**-126, flush to zero) and accumulated in fp32.

Selection (decided when a function is traced):
* `GPTOSS_MXFP4_KERNEL` = `auto` (default: on for x86-64 CPUs when the library loads), `1` (on; an error if the
  library is missing), `0` (off: the pure-XLA dequantize-then-einsum path). `set_kernel_mode` / `use_kernel`
  change it in-process; they clear JAX's caches so that already-jitted functions are traced again.
  The switch covers both kernels of the library: this one and the dense bf16-weight matmul of decode-sized
  projections (gptoss.kernels.dense_cpu, which adds its own conditions: bf16 weight, few tokens, one device).
* Only when JAX's default backend is the CPU; on GPU/TPU the XLA path is used.
* If the library was not built (no C++ compiler at install time), one warning, then the XLA path.
* `GPTOSS_MXFP4_LIB` points at another build of the library; `GPTOSS_MXFP4_THREADS` sizes its thread pool.

Differentiation: reverse mode only, with respect to x (the packed weights are frozen integers). The input
gradient dx[m] = sum_s W[idx[m, s]]^T dy[m, s] is computed in XLA, one dequantized expert at a time.
Forward mode (jax.jvp / jacfwd) is not supported through the kernel; use GPTOSS_MXFP4_KERNEL=0 for it.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import platform
import threading
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from gptoss.quant.mxfp4 import MXFP4Array, dequantize

TARGET = "gptoss_mxfp4_matmul"
LIB_NAME = "libgptoss_mxfp4.so"
MODES = ("auto", "0", "1")
ISAS = ("scalar", "avx2", "avx512", "amx")


class KernelUnavailableWarning(RuntimeWarning):
    """The MXFP4 CPU kernel could not be loaded; gptoss runs the (much slower) pure-XLA path."""


_lock = threading.Lock()
_state: dict = {"tried": False, "lib": None, "error": None, "warned": False, "mode": None}


def library_path() -> Path:
    return Path(os.environ.get("GPTOSS_MXFP4_LIB") or Path(__file__).with_name(LIB_NAME))


def load_library():
    """Loads the shared library and registers the FFI target, once; returns the ctypes handle or None."""
    with _lock:
        if not _state["tried"]:
            _state["tried"] = True
            path = library_path()
            try:
                if not path.exists():
                    raise OSError(f"{path} does not exist (it is built by `pip install -e .`)")
                lib = ctypes.CDLL(str(path))
                _declare(lib)
                jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.GptossMxfp4Matmul), platform="cpu")
                _state["lib"] = lib
            except (OSError, AttributeError) as e:
                _state["error"] = f"{type(e).__name__}: {e}"
    return _state["lib"]


def _declare(lib) -> None:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.gptoss_mxfp4_matmul.argtypes = [ptr, ctypes.c_int, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, ctypes.c_int]
    lib.gptoss_mxfp4_matmul.restype = ctypes.c_int
    for name in ("gptoss_mxfp4_set_isa", "gptoss_mxfp4_set_num_threads"):
        getattr(lib, name).argtypes = [ctypes.c_int]


def kernel_available() -> bool:
    """Whether the library is built and loads (regardless of the mode and platform)."""
    return load_library() is not None


def load_error() -> str | None:
    load_library()
    return _state["error"]


def kernel_mode() -> str:
    mode = _state["mode"] or os.environ.get("GPTOSS_MXFP4_KERNEL", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"GPTOSS_MXFP4_KERNEL must be one of {MODES}, got {mode!r}")
    return mode


def set_kernel_mode(mode: str | None) -> str | None:
    """Sets the mode for this process (None: back to the environment variable); returns the previous setting.
    Clears JAX's caches when the decision changes, so already-jitted functions are traced again."""
    if mode is not None and mode not in MODES:
        raise ValueError(f"kernel mode must be one of {MODES} or None, got {mode!r}")
    before, previous = _decision(), _state["mode"]
    _state["mode"] = mode
    if _decision() != before:
        jax.clear_caches()
    return previous


@contextlib.contextmanager
def use_kernel(mode: str | bool):
    """`with use_kernel(False): ...` runs the enclosed (freshly traced) code on the pure-XLA path."""
    mode = {True: "1", False: "0"}.get(mode, mode)
    previous = set_kernel_mode(mode)
    try:
        yield
    finally:
        set_kernel_mode(previous)


def _decision() -> tuple:
    mode = kernel_mode()
    return (mode, mode != "0" and kernel_available())


def _x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def kernel_enabled() -> bool:
    """Whether matmuls traced now use the library's kernels (MXFP4 experts; dense bf16 ones see dense_cpu.serves)."""
    mode = kernel_mode()
    if mode == "0" or jax.default_backend() != "cpu" or (mode == "auto" and not _x86()):
        return False
    if kernel_available():
        return True
    if mode == "1":
        raise RuntimeError(f"GPTOSS_MXFP4_KERNEL=1 but the MXFP4 CPU kernel is unavailable: {_state['error']}")
    with _lock:
        first, _state["warned"] = not _state["warned"], True
    if first:
        warnings.warn(f"gptoss: the MXFP4 CPU kernel is unavailable ({_state['error']}); using the pure-XLA "
                      "dequantize path, two orders of magnitude slower on the expert matmuls. Reinstall with a C++ "
                      "compiler present (`pip install -e .`), or set GPTOSS_MXFP4_KERNEL=0 to choose the XLA path.",
                      KernelUnavailableWarning, stacklevel=2)
    return False


# ------------------------------------------------------------------------------------------------- the op
def mx_gather_matmul(x_MK, w: MXFP4Array, idx_MS, *, grouped: bool = False) -> jax.Array:
    """x [M, K] (any float dtype; bf16 and f32 are passed as they are), w packed [E, N, K], idx int [M, S]
    -> fp32 [M, S, N] with y[m, s] = w[idx[m, s]] @ x[m]. Uses the kernel; call it only if kernel_available()."""
    if not isinstance(w, MXFP4Array) or w.ndim != 3:
        raise TypeError(f"mx_gather_matmul needs a packed [E, N, K] MXFP4Array, got {w!r}")
    x_MK, idx_MS = jnp.asarray(x_MK), jnp.asarray(idx_MS, jnp.int32)
    if x_MK.ndim != 2 or idx_MS.ndim != 2 or x_MK.shape[0] != idx_MS.shape[0] or x_MK.shape[1] != w.shape[-1]:
        raise ValueError(f"mx_gather_matmul: x {x_MK.shape}, idx {idx_MS.shape} and w {w.shape} do not fit "
                         "x [M, K], idx [M, S], w [E, N, K]")
    if x_MK.dtype not in (jnp.float32, jnp.bfloat16):
        x_MK = x_MK.astype(jnp.float32)
    if load_library() is None:
        raise RuntimeError(f"the MXFP4 CPU kernel is unavailable: {_state['error']}")
    return _matmul(x_MK, w.blocks, w.scales, idx_MS, bool(grouped))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _matmul(x, blocks, scales, idx, grouped):
    M, S, N = x.shape[0], idx.shape[1], blocks.shape[1]
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((M, S, N), jnp.float32), vmap_method="sequential")
    return call(x, blocks, scales, idx, grouped=np.int64(grouped))


def _matmul_fwd(x, blocks, scales, idx, grouped):
    return _matmul(x, blocks, scales, idx, grouped), (x, blocks, scales, idx)


def _matmul_bwd(grouped, res, dy_MSN):
    x, blocks, scales, idx = res

    def one_expert(e, dx):
        w_NK = dequantize(jax.lax.dynamic_index_in_dim(blocks, e, keepdims=False),
                          jax.lax.dynamic_index_in_dim(scales, e, keepdims=False), jnp.float32)
        dy_MN = jnp.einsum("ms,msn->mn", (idx == e).astype(jnp.float32), dy_MSN)
        return dx + dy_MN @ w_NK

    dx = jax.lax.fori_loop(0, blocks.shape[0], one_expert, jnp.zeros(x.shape, jnp.float32))
    zero = lambda a: np.zeros(a.shape, jax.dtypes.float0)  # noqa: E731 - integer inputs: no cotangent
    return dx.astype(x.dtype), zero(blocks), zero(scales), zero(idx)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


# ------------------------------------------------------------------------------------------------- tuning
def set_isa(isa: str) -> str:
    """Caps the vector path ('scalar', 'avx2', 'avx512', 'amx': AVX-512 plus AMX tiles for grouped bf16 inputs) at what
    the CPU supports; returns the one in use."""
    lib = load_library()
    if lib is None:
        raise RuntimeError(f"the MXFP4 CPU kernel is unavailable: {_state['error']}")
    return ISAS[lib.gptoss_mxfp4_set_isa(ISAS.index(isa))]


def isa() -> str:
    lib = load_library()
    return ISAS[lib.gptoss_mxfp4_isa()] if lib is not None else "unavailable"


def set_num_threads(n: int) -> int:
    """Resizes the kernel's thread pool (n <= 0: GPTOSS_MXFP4_THREADS or the CPU count); returns the size."""
    lib = load_library()
    if lib is None:
        raise RuntimeError(f"the MXFP4 CPU kernel is unavailable: {_state['error']}")
    return lib.gptoss_mxfp4_set_num_threads(int(n))
