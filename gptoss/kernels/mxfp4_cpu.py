"""The MXFP4 CPU kernel (csrc/mxfp4_matmul.cc) as a jit-able JAX op.

`mx_gather_matmul(x [M, K], w [E, N, K] packed, idx [M, S]) -> [M, S, N] fp32` with
y[m, s] = W[idx[m, s]] . x[m], computed by an XLA FFI custom call that reads the packed MXFP4 bytes in place
(no dequantized copy). `grouped=True` buckets the (m, s) pairs by expert and streams each expert's weights
once for all of its rows (prefill); `grouped=False` is one GEMV per pair (decode). Same result either way.
A negative index skips its pair (expert parallelism marks the pairs routed to other devices' experts -1): its
output row is zero and the kernel does no work for it. An index >= E is an error.
On CPUs with AVX-512 VNNI and VBMI, or AVX2 but no AVX-512, one-token (decode) calls round x to 15-bit block
floating point per 32 elements and multiply on integers, memory-bound instead of compute-bound (`set_exact_gemv`,
`x16_active`), or opt-in to 8-bit blocks as llama.cpp does (`set_gemv_input("x8")`, `x8_active`);
every other path is exact.
Grouped calls with bf16 inputs use AMX tiles where the CPU has them (Sapphire Rapids and later): the weights are
dequantized exactly to bf16 (subnormal weights, |w| < 2**-126, flush to zero) and accumulated in fp32.

Selection: the model's `kernels` option (gptoss.kernels.select) decides, when a function is traced, whether the
kernels of this library run. `GPTOSS_MXFP4_LIB` points at another build of the library; `GPTOSS_MXFP4_THREADS`
sizes its thread pool. If the library was not built (no C++ compiler at install time), the pure-XLA paths run.

Differentiation: reverse mode only, with respect to x (the packed weights are frozen integers). The input
gradient dx[m] = sum_s W[idx[m, s]]^T dy[m, s] is the same custom call in its transposed mode
(`mx_gather_matmul_t`, with the forward's `grouped`), which also reads the packed bytes in place and touches only
the experts that some pair uses.
Forward mode (jax.jvp / jacfwd) is not supported through the kernel (nor through `grouped_matmul`, also a custom
VJP); `kernels="xla"` with `moe_impl="dense"` or `"gather"` supports it.
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from gptoss.manual_axes import cotangent_like, varying_like
from gptoss.quant.mxfp4 import MXFP4Array

TARGET = "gptoss_mxfp4_matmul"
LIB_NAME = "libgptoss_mxfp4.so"
ISAS = ("scalar", "avx2", "avx512", "avx512bf16", "amx")
# Outside the cap order: the AMX path's algorithm (packing, bf16 table, tile loop) on a portable emulation of the
# tile instructions, the best vector path elsewhere; any CPU (how tests cover the AMX code without AMX). Slow.
AMX_EMULATED = "amx_emulated"
_ISA_CODES = (*ISAS, AMX_EMULATED)  # the library's ISA numbers


_lock = threading.Lock()
_state: dict = {"tried": False, "lib": None, "error": None}


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
                check_gemv_env()
            except (OSError, AttributeError) as e:
                _state["error"] = f"{type(e).__name__}: {e}"
    return _state["lib"]


def _declare(lib) -> None:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.gptoss_mxfp4_matmul.argtypes = [ptr, ctypes.c_int, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, ctypes.c_int]
    lib.gptoss_mxfp4_matmul.restype = ctypes.c_int
    for name in ("gptoss_mxfp4_set_isa", "gptoss_mxfp4_set_num_threads", "gptoss_mxfp4_set_exact_gemv",
                 "gptoss_mxfp4_set_spin_micros", "gptoss_mxfp4_set_gemv_input"):
        getattr(lib, name).argtypes = [ctypes.c_int]


class KernelFamily:
    """Another kernel family's FFI targets on this library, set up once by `setup(lib)` (ctypes signatures, target
    registration); `load()` returns the library, or None with the reason in `error` (a library built before the
    family existed lacks its symbols: AttributeError)."""

    def __init__(self, setup):
        self._setup, self._lock, self._tried = setup, threading.Lock(), False
        self.lib, self.error = None, None

    def load(self):
        with self._lock:
            if not self._tried:
                self._tried = True
                lib = load_library()
                try:
                    if lib is None:
                        raise OSError(load_error())
                    self._setup(lib)
                    self.lib = lib
                except (OSError, AttributeError) as e:
                    self.error = f"{type(e).__name__}: {e}"
        return self.lib


def kernel_available() -> bool:
    """Whether the library is built and loads (regardless of the platform)."""
    return load_library() is not None


def load_error() -> str | None:
    load_library()
    return _state["error"]


# ------------------------------------------------------------------------------------------------- the op
def loaded_library():
    """The library, or a RuntimeError saying why it is unavailable (for the calls that need it)."""
    lib = load_library()
    if lib is None:
        raise RuntimeError(f"the MXFP4 CPU kernel is unavailable: {_state['error']}")
    return lib


def mx_gather_matmul(x_MK, w: MXFP4Array, idx_MS, *, grouped: bool = False) -> jax.Array:
    """x [M, K] (any float dtype; bf16 and f32 are passed as they are), w packed [E, N, K], idx int [M, S]
    -> fp32 [M, S, N] with y[m, s] = w[idx[m, s]] @ x[m], and y[m, s] = 0 where idx[m, s] < 0 (a skipped pair).
    Differentiable in x; the gradient runs mx_gather_matmul_t. Uses the kernel; call it only if kernel_available()."""
    if not isinstance(w, MXFP4Array) or w.ndim != 3:
        raise TypeError(f"mx_gather_matmul needs a packed [E, N, K] MXFP4Array, got {w!r}")
    x_MK, idx_MS = jnp.asarray(x_MK), jnp.asarray(idx_MS, jnp.int32)
    if x_MK.ndim != 2 or idx_MS.ndim != 2 or x_MK.shape[0] != idx_MS.shape[0] or x_MK.shape[1] != w.shape[-1]:
        raise ValueError(f"mx_gather_matmul: x {x_MK.shape}, idx {idx_MS.shape} and w {w.shape} do not fit "
                         "x [M, K], idx [M, S], w [E, N, K]")
    return _matmul(_kernel_operand(x_MK), w.blocks, w.scales, idx_MS, bool(grouped))


def _kernel_operand(a):
    """bf16 and f32 go to the kernel as they are, other floats as f32; the library must be loaded."""
    loaded_library()
    return a if a.dtype in (jnp.float32, jnp.bfloat16) else a.astype(jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _matmul(x, blocks, scales, idx, grouped):
    M, S, N = x.shape[0], idx.shape[1], blocks.shape[1]
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((M, S, N), jnp.float32), vmap_method="sequential")
    # (inside shard_map an ffi_call's result is typed as varying over no mesh axis; it varies like its inputs)
    return varying_like(call(x, blocks, scales, idx, grouped=np.int64(grouped)), x, blocks, scales, idx)


def _matmul_fwd(x, blocks, scales, idx, grouped):
    return _matmul(x, blocks, scales, idx, grouped), (x, blocks, scales, idx)


def _no_cotangent(a):
    return np.zeros(a.shape, jax.dtypes.float0)  # integer inputs


def _matmul_bwd(grouped, res, dy_MSN):
    x, blocks, scales, idx = res
    dx = cotangent_like(_matmul_t(dy_MSN, blocks, scales, idx, grouped).sum(axis=1).astype(x.dtype), x)
    return dx, _no_cotangent(blocks), _no_cotangent(scales), _no_cotangent(idx)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def mx_gather_matmul_t(dy_MSN, w: MXFP4Array, idx_MS, *, grouped: bool = False) -> jax.Array:
    """The transposed product: dy [M, S, N] (any float dtype; bf16 and f32 are passed as they are), w packed
    [E, N, K], idx int [M, S] -> fp32 [M, S, K] with dx[m, s] = w[idx[m, s]]^T @ dy[m, s], and 0 where
    idx[m, s] < 0. mx_gather_matmul's input gradient is its sum over s. `grouped` as there: True streams each
    expert's packed rows once for all of its pairs, False once per pair. Uses the kernel; call it only if
    kernel_available()."""
    if not isinstance(w, MXFP4Array) or w.ndim != 3:
        raise TypeError(f"mx_gather_matmul_t needs a packed [E, N, K] MXFP4Array, got {w!r}")
    dy_MSN, idx_MS = jnp.asarray(dy_MSN), jnp.asarray(idx_MS, jnp.int32)
    if dy_MSN.ndim != 3 or idx_MS.ndim != 2 or dy_MSN.shape[:2] != idx_MS.shape or dy_MSN.shape[2] != w.shape[1]:
        raise ValueError(f"mx_gather_matmul_t: dy {dy_MSN.shape}, idx {idx_MS.shape} and w {w.shape} do not fit "
                         "dy [M, S, N], idx [M, S], w [E, N, K]")
    return _matmul_t(_kernel_operand(dy_MSN), w.blocks, w.scales, idx_MS, bool(grouped))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _matmul_t(dy, blocks, scales, idx, grouped):
    M, S, K = dy.shape[0], dy.shape[1], 32 * blocks.shape[2]
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((M, S, K), jnp.float32), vmap_method="sequential")
    return varying_like(call(dy, blocks, scales, idx, grouped=np.int64(grouped), transpose=np.int64(1)),
                        dy, blocks, scales, idx)


def _matmul_t_fwd(dy, blocks, scales, idx, grouped):
    return _matmul_t(dy, blocks, scales, idx, grouped), (dy, blocks, scales, idx)


def _matmul_t_bwd(grouped, res, ddx_MSK):
    # linear in dy: its cotangent is the forward product, each (m, s) pair a token of its own
    dy, blocks, scales, idx = res
    M, S, K = ddx_MSK.shape
    ddy = _matmul(ddx_MSK.reshape(M * S, K), blocks, scales, idx.reshape(M * S, 1), grouped).reshape(M, S, -1)
    return cotangent_like(ddy.astype(dy.dtype), dy), _no_cotangent(blocks), _no_cotangent(scales), _no_cotangent(idx)


_matmul_t.defvjp(_matmul_t_fwd, _matmul_t_bwd)


# ------------------------------------------------------------------------------------------------- tuning
def set_isa(isa: str) -> str:
    """Caps the vector path ('scalar', 'avx2', 'avx512', then 'avx512bf16' and 'amx': AVX-512 plus VDPBF16PS or AMX
    tiles for grouped bf16 inputs) at what the CPU supports, or selects AMX_EMULATED (any CPU); returns the one in
    use."""
    lib = loaded_library()
    return _ISA_CODES[lib.gptoss_mxfp4_set_isa(_ISA_CODES.index(isa))]


def isa() -> str:
    lib = load_library()
    return _ISA_CODES[lib.gptoss_mxfp4_isa()] if lib is not None else "unavailable"


def set_exact_gemv(exact: bool) -> bool:
    """One-token GEMVs (decode) on the AVX2 and AVX-512 VNNI paths: True keeps x exact in fp32; False (the default,
    unless GPTOSS_MXFP4_EXACT_GEMV=1) rounds each 32-block of x to 15-bit block floating point and multiplies on
    integers (|error| <= 2**-14 * the block's max |x| per element; ~1.6x the GEMV's speed on a Zen 3 core), or to x8
    where `set_gemv_input("x8")` chose it. Other paths are always exact. Returns the previous setting."""
    lib = loaded_library()
    return bool(lib.gptoss_mxfp4_set_exact_gemv(int(bool(exact))))


def exact_gemv() -> bool | None:
    """Whether one-token GEMVs on the x16 paths keep x exact (`set_exact_gemv`); None without the library."""
    lib = load_library()
    return bool(lib.gptoss_mxfp4_exact_gemv()) if lib is not None else None


def x16_active() -> bool:
    """Whether one-token GEMVs round x to x16 now: `gemv_input()` is "x16" (the default) and the ISA in use has the
    integer kernels (AVX2; AVX-512 where the CPU has VNNI and VBMI)."""
    lib = load_library()
    return lib is not None and bool(lib.gptoss_mxfp4_x16_active())


GEMV_INPUTS = ("exact", "x16", "x8")


def set_gemv_input(mode: str) -> str:
    """What one-token GEMVs (decode) on the x16 paths multiply: "exact" fp32 x, "x16" (the default: 15-bit block
    floating point, `set_exact_gemv`) or "x8", opt-in: each 32-block of x becomes q * d with d = max|x| / 127 and
    q = rint(x / d) in [-127, 127] (llama.cpp's 8-bit activations, Q8_0, with an fp32 d; |error| <= max|x| / 254
    per element), half x16's integer products; wherever x16 runs (`x8_active`).
    GPTOSS_MXFP4_GEMV_INPUT sets it at start. Returns the previous mode."""
    if mode not in GEMV_INPUTS:
        raise ValueError(f"gemv input must be one of {GEMV_INPUTS}, not {mode!r}")
    lib = loaded_library()
    return GEMV_INPUTS[lib.gptoss_mxfp4_set_gemv_input(GEMV_INPUTS.index(mode))]


def check_gemv_env() -> None:
    """The library reads GPTOSS_MXFP4_GEMV_INPUT once and takes anything unknown for x16: say so."""
    value = os.environ.get("GPTOSS_MXFP4_GEMV_INPUT")
    if value and value not in GEMV_INPUTS:
        warnings.warn(f"GPTOSS_MXFP4_GEMV_INPUT={value!r} is not one of {GEMV_INPUTS}: the CPU decode GEMV runs on x16",
                      stacklevel=2)


def gemv_input() -> str | None:
    """The mode `set_gemv_input` chose ("exact", "x16", "x8"); None without the library."""
    lib = load_library()
    return GEMV_INPUTS[lib.gptoss_mxfp4_gemv_input()] if lib is not None else None


def x8_active() -> bool:
    """Whether one-token GEMVs round x to x8 now: `gemv_input()` is "x8" and the ISA in use has the integer kernels
    (AVX2; AVX-512 where the CPU has VNNI and VBMI)."""
    lib = load_library()
    return lib is not None and bool(lib.gptoss_mxfp4_x8_active())


def set_num_threads(n: int) -> int:
    """Resizes the kernel's thread pool (n <= 0: GPTOSS_MXFP4_THREADS or the CPU count); returns the size."""
    lib = loaded_library()
    return lib.gptoss_mxfp4_set_num_threads(int(n))


def set_spin_micros(us: int) -> int:
    """How long the kernels' idle pool workers poll for the next call before they sleep, in microseconds (shared by
    the MXFP4 and dense kernels). Decode's calls come every 0.1-2 ms; a sleeping worker's wake-up costs ~30 us of
    each. 0 sleeps at once (a machine whose cores other work needs); < 0 restores the default: GPTOSS_POOL_SPIN_US,
    else 1000. Returns the value in use."""
    lib = loaded_library()
    return lib.gptoss_mxfp4_set_spin_micros(int(us))


def read_probe(buffers) -> int:
    """Reads each buffer (C-contiguous numpy arrays, or CPU jax arrays: read in place) once, as one run on the
    kernels' thread pool that does nothing else with the bytes; returns the sum of their 64-bit words mod 2**64
    (each buffer's last partial word zero-padded). A roofline for the memory-bound decode kernels: the benchmarks
    time a decode step's weight bytes read this way in the same seconds as the step."""
    lib = loaded_library()
    try:
        probe = lib.gptoss_read_probe
    except AttributeError:
        raise RuntimeError(f"{library_path()} predates read_probe: rebuild it (pip install -e .)") from None
    arrays = [np.asarray(b) for b in buffers]  # a CPU jax array's buffer, not a copy
    for i, a in enumerate(arrays):
        if not a.flags.c_contiguous:
            raise ValueError(f"read_probe: buffer {i} (shape {a.shape}) is not C-contiguous; a copy would be timed")
    probe.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_int64), ctypes.c_int64]
    probe.restype = ctypes.c_uint64
    n = len(arrays)
    ptrs = (ctypes.c_void_p * n)(*(a.ctypes.data for a in arrays))
    sizes = (ctypes.c_int64 * n)(*(a.nbytes for a in arrays))
    return int(probe(ptrs, sizes, n))
