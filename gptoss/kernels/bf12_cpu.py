"""bf12 weights (gptoss.quant.bf12) on the CPU kernel library (csrc/bf12_matmul.cc): pack, unpack, decode's GEMV.

`matmul_many(x_MK, ws)`: bf16 x [M, K] times each packed weight's [R, K] rows, fp32 [M, R] results, in one pool run
(decode's q, k and v, like dense_cpu.dense_matmul_many). On CPUs with AVX-512 VBMI and BF16, for up to 4 tokens each
32-weight block is decoded in registers once and multiplied by VDPBF16PS in the order of the dense bf16 rows path, so
a row without exceptions gives the bits the bf16 weight gives there (the exceptions are added after each row's sum);
from 5 tokens rows are decoded with their exceptions into scratch for the dense tiles (every row: the dense bits).
Elsewhere the scalar reference runs (slow): `fast()` says which, and gptoss packs weights only when it is the fast one.

`unpack(w)`: the bf16 weight on the library's threads (prefill, where a GEMM wants bf16 rows), the twin of
BF12Array.unpack. `pack(w)`: the bytes of gptoss.quant.bf12.pack_bf12, on the library's threads.
"""

from __future__ import annotations

import ctypes
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from gptoss.kernels import mxfp4_cpu
from gptoss.quant.bf12 import BF12Array, pack_bf12

TARGET = "gptoss_bf12_matmul"
TARGET_UNPACK = "gptoss_bf12_unpack"
ISAS = ("scalar", "avx512", "amx", "amx_emulated")  # the last outside the cap order: AMX's tile loop emulated (tests)
MAX_TOKENS = 4  # the row GEMV decodes a block once for up to 4 tokens; from 5 the tiles serve, where there are tiles


def _setup(lib) -> None:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.gptoss_bf12_pack.argtypes = [ptr, i64, i64, ptr, ptr]
    lib.gptoss_bf12_pack.restype = i64
    lib.gptoss_bf12_exceptions.argtypes = [ptr, i64, i64, ptr, ptr, ptr, ptr]
    lib.gptoss_bf12_exceptions.restype = None
    lib.gptoss_bf12_matmul.argtypes = [ptr, ptr, i64, i64, i64, ptr, ptr, ptr, i64, ptr]
    lib.gptoss_bf12_unpack.argtypes = [ptr, i64, i64, ptr, ptr, ptr, i64, ptr]
    lib.gptoss_bf12_set_isa.argtypes = [ctypes.c_int]
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.GptossBf12Matmul), platform="cpu")
    jax.ffi.register_ffi_target(TARGET_UNPACK, jax.ffi.pycapsule(lib.GptossBf12Unpack), platform="cpu")


_family = mxfp4_cpu.KernelFamily(_setup)


def load_library():
    """The shared library with these FFI targets registered, once; None if unavailable."""
    return _family.load()


def kernel_available() -> bool:
    return load_library() is not None


def loaded_library():
    """The library with these targets, or a RuntimeError saying why it is unavailable."""
    lib = load_library()
    if lib is None:
        raise RuntimeError(f"the bf12 CPU kernel is unavailable: {_family.error}")
    return lib


def isa() -> str:
    lib = load_library()
    return ISAS[lib.gptoss_bf12_isa()] if lib is not None else "unavailable"


def set_isa(name: str) -> str:
    """Caps the kernels at 'scalar' (the reference), 'avx512' (VBMI + BF16: decode in registers, VDPBF16PS tiles for
    prefill) or 'amx' (AMX tiles for prefill) where the CPU has them, or picks 'amx_emulated' (tests); returns the one
    in use."""
    return ISAS[loaded_library().gptoss_bf12_set_isa(ISAS.index(name))]


def fast() -> bool:
    """Whether this CPU runs the decoded-in-registers GEMV (where packing pays: fewer bytes at the same speed)."""
    return best_isa() in ("avx512", "amx")


def best_isa() -> str:
    """The best path this CPU and build have (the cap GPTOSS_MXFP4_ISA applied), whatever set_isa chose."""
    lib = load_library()
    return ISAS[lib.gptoss_bf12_best_isa()] if lib is not None else "unavailable"


def packs_by_default() -> bool:
    """Whether `dense_weights: auto` packs here: where the GEMV decodes in registers and the CPU has no AMX. Measured
    on Zen 4 (decode 1.2x, prefill at par); next to AMX's faster tiles prefill's decode weighs more and bf12 is
    unmeasured there, so AMX CPUs keep bf16 unless asked for 'bf12'."""
    return best_isa() == "avx512"


def serves(tokens: int, x, *, enabled: bool = True) -> bool:
    """Whether x (tokens rows) times a BF12Array goes to the kernel now (else: unpack, then the dense path): bf16 x on
    one device, a few tokens, or any number where the ISA in use has tiles."""
    if not (enabled and tokens >= 1 and x.dtype == jnp.bfloat16 and jax.device_count() == 1 and kernel_available()):
        return False
    return tokens <= MAX_TOKENS or isa() != "scalar"


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


def pack(w, n_in: int = 1) -> BF12Array:
    """pack_bf12(w, n_in), on the kernel library's threads when it loaded (same bytes; ~100x faster)."""
    lib = load_library()
    w = np.asarray(w)
    if lib is None or w.dtype != ml_dtypes.bfloat16 or not 1 <= n_in < w.ndim:
        return pack_bf12(w, n_in)  # the reference, and its errors
    R, K = math.prod(w.shape[:-n_in]), math.prod(w.shape[-n_in:])
    if K % 32:
        return pack_bf12(w, n_in)
    bits = np.ascontiguousarray(w.reshape(R, K)).view(np.uint16)
    data = np.empty((R, K // 32 * 49), np.uint8)
    counts = np.empty(R + 1, np.int64)
    total = lib.gptoss_bf12_pack(_ptr(bits), R, K, _ptr(data), _ptr(counts[1:]))
    counts[0] = 0
    offsets = np.cumsum(counts)
    rows, cols = np.empty(total, np.int32), np.empty(total, np.int32)
    exc = np.empty(total, np.uint16)
    if total:
        lib.gptoss_bf12_exceptions(_ptr(bits), R, K, _ptr(offsets), _ptr(rows), _ptr(cols), _ptr(exc))
    return BF12Array(data, rows, cols, exc, w.shape, n_in)


def unpack(w: BF12Array) -> jax.Array:
    """The bf16 weight (w.shape), bit for bit, by the kernel library (a custom call, inside or outside jit)."""
    loaded_library()
    R, K = w.rows_cols
    call = jax.ffi.ffi_call(TARGET_UNPACK, jax.ShapeDtypeStruct((R, K), jnp.bfloat16), vmap_method="sequential")
    return call(w.data, w.exc_rows, w.exc_cols, w.exc_bits).reshape(w.shape)


def matmul_many(x_MK, ws) -> tuple[jax.Array, ...]:
    """bf16 x [M, K] times each BF12Array of `ws` (rows [R_i, K]) -> a tuple of fp32 [M, R_i], one kernel call."""
    x_MK = jnp.asarray(x_MK)
    ws = tuple(ws)
    if not ws:
        raise ValueError("bf12 matmul_many: no weights")
    for i, w in enumerate(ws):
        if not isinstance(w, BF12Array):
            raise TypeError(f"bf12 matmul_many: weight {i} is a {type(w).__name__}, not a BF12Array")
        if x_MK.ndim != 2 or x_MK.shape[1] != w.rows_cols[1]:
            raise ValueError(f"bf12 matmul_many: x {x_MK.shape} does not fit weight {i}'s rows {w.rows_cols}")
    if x_MK.dtype != jnp.bfloat16:
        raise TypeError(f"bf12 matmul_many: x must be bfloat16, got {x_MK.dtype}")
    loaded_library()
    return _matmul(x_MK, ws)


@jax.custom_vjp
def _matmul(x, ws):
    out = tuple(jax.ShapeDtypeStruct((x.shape[0], w.rows_cols[0]), jnp.float32) for w in ws)
    args = [a for w in ws for a in (w.data, w.exc_rows, w.exc_cols, w.exc_bits)]
    return tuple(jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")(x, *args))


def _matmul_fwd(x, ws):
    return _matmul(x, ws), (x, ws)


def _matmul_bwd(res, dys):
    """dx = sum_i dy_i W_i (W unpacked); the packed weights are frozen integers (float0 cotangents)."""
    x, ws = res
    dx = sum(jnp.einsum("mr,rk->mk", dy, unpack(w).reshape(w.rows_cols), preferred_element_type=jnp.float32)
             for w, dy in zip(ws, dys))
    zero = jax.tree.map(lambda a: np.zeros(a.shape, jax.dtypes.float0), ws)
    return dx.astype(x.dtype), zero


_matmul.defvjp(_matmul_fwd, _matmul_bwd)
