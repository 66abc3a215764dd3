"""The dense bf16-weight CPU matmul (csrc/dense_matmul.cc) as a jit-able JAX op, for decode on XLA:CPU.

`dense_matmul(x [M, K], w, *, w_nk) -> fp32 [M, N]`: w is [N, K] (`w_nk=True`, e.g. the unembedding or attention's
wq reshaped to [N*H, D]) or [K, N] (`w_nk=False`, input-major), bf16 or fp32, read in place by an
XLA FFI custom call. Why: for a few tokens XLA:CPU converts the whole bf16 weight to an fp32 scratch copy on
every call (~2 GB/s, and 2.16 GiB of scratch for gpt-oss's unembedding); the kernel streams the bf16 bytes once
at close to memory speed. Products and sums are fp32 (bf16 -> fp32 is exact); one token of bf16 x times bf16 W [N, K]
on a CPU with AVX512_BF16 runs VDPBF16PS (the same exact products, fp32 sums; bf16 subnormals read as zero).

Selection (`serves`, decided at trace time): the model's `kernels` option must allow the CPU kernels
(gptoss.kernels.select.cpu_kernels, which covers both kernels of the shared library); in addition the weight must
be bf16, the tokens few (M <=
MAX_TOKENS, or MAX_TOKENS_VS_BF16_GEMM where XLA would run its native bf16 GEMM: bf16 x and W, fp32 result; any
number for bf16 x times W [N, K] on the AMX / VDPBF16PS tiles, and on AVX2's panel GEMM) and
there must be one JAX device (on several, a custom call would make XLA's SPMD partitioner replicate the weight).

Differentiation: reverse mode, both inputs: dx = dy W^T and dW = x^T dy (in W's layout and dtype) in XLA.
"""

from __future__ import annotations

import ctypes
import functools

import jax
import jax.numpy as jnp
import numpy as np

from gptoss.kernels import mxfp4_cpu

TARGET = "gptoss_dense_matmul"
TARGET_MANY = "gptoss_dense_matmul_many"  # one x times several weights in one call (dense_matmul_many)
ISAS = ("scalar", "avx2", "avx512", "avx512bf16", "amx")
AMX_EMULATED = mxfp4_cpu.AMX_EMULATED  # the tile path on emulated AMX instructions, any CPU (tests); not in serves
_ISA_CODES = (*ISAS, AMX_EMULATED)
# Kernel for M <= these many tokens; measured crossovers against XLA:CPU (benchmarks/dense_kernel.py, 2 cores):
MAX_TOKENS = 128  # vs einsums XLA runs by converting the weight to fp32 (bf16 result): XLA still 1.2x slower at 192
MAX_TOKENS_VS_BF16_GEMM = 4  # vs bf16 x and W with an fp32 result: XLA's own bf16 GEMM, faster from 3-6 tokens
MAX_TOKENS_VS_BF16_GEMM_KN = 12  # the same for W [K, N]: XLA's GEMM is slower there up to 8-16 tokens (measured on
# attention's wq and wo while the model stored them [in, out], before 2026-12-02)
# ... and bf16 x times bf16 [N, K] on these: the kernel at any size (the AMX tiles from 4 tokens, VDPBF16PS from 5)
TILE_ISAS = ("avx512bf16", "amx")
# ... and bf16 x times bf16 W on AVX2 CPUs: the kernel at any size for W [K, N], and from panel_min_tokens() for W
# [N, K] (its fp32 panel GEMM: 1.3-1.4x XLA's bf16 GEMM at 128 tokens on attention's wq and wo on a 2-core Zen 3,
# then laid out [K, N]; [N, K] packs its panels transposed)
PANEL_COLS_ISAS = ("avx2",)


def _setup(lib) -> None:
    i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.gptoss_dense_matmul.argtypes = [ptr, c_int, ptr, c_int, c_int, ptr, i64, i64, i64]
    lib.gptoss_dense_matmul.restype = c_int
    lib.gptoss_dense_set_isa.argtypes = [c_int]
    lib.gptoss_dense_panel_min_tokens.restype = c_int
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.GptossDenseMatmul), platform="cpu")
    jax.ffi.register_ffi_target(TARGET_MANY, jax.ffi.pycapsule(lib.GptossDenseMatmulMany), platform="cpu")


_family = mxfp4_cpu.KernelFamily(_setup)


def load_library():
    """The shared library (loaded by mxfp4_cpu) with this op's FFI targets registered, once; None if unavailable."""
    return _family.load()


def kernel_available() -> bool:
    return load_library() is not None


def loaded_library():
    """The library with this op's targets, or a RuntimeError saying why it is unavailable."""
    lib = load_library()
    if lib is None:
        raise RuntimeError(f"the dense CPU kernel is unavailable: {_family.error}")
    return lib


def panel_min_tokens() -> int:
    """The token count from which the kernel's AVX2 panel GEMM serves (csrc dense_kernel.h kColsPanelMinTokens)."""
    lib = loaded_library()
    return lib.gptoss_dense_panel_min_tokens()


def load_error() -> str | None:
    load_library()
    return _family.error


def serves(tokens: int, w, *, xla_bf16_gemm: bool = False, w_nk: bool = True, tile_rows: bool = False,
           enabled: bool = True) -> bool:
    """Whether a matmul of `tokens` rows with weight `w`, traced now, goes to the dense kernel (`enabled`: the
    model's kernels option allows the CPU kernels, gptoss.kernels.select.cpu_kernels). `xla_bf16_gemm`:
    XLA's alternative is its native bf16 GEMM (bf16 x and w, fp32 result), which wins from a few tokens on
    (`w_nk`: w is [N, K], else [K, N]); except on an AVX2 CPU, where the kernel's panel GEMM is faster (any size
    for w [K, N], from panel_min_tokens() for w [N, K]). `tile_rows`: bf16 x, w [N, K] with K % 32 == 0, which on a
    CPU with AMX or AVX512_BF16 the kernel's tile paths serve at any size."""
    limit = (MAX_TOKENS_VS_BF16_GEMM if w_nk else MAX_TOKENS_VS_BF16_GEMM_KN) if xla_bf16_gemm else MAX_TOKENS
    if not (jnp.dtype(w.dtype) == jnp.bfloat16 and tokens >= 1 and enabled
            and jax.device_count() == 1 and kernel_available()):
        return False
    return (tokens <= limit or (tile_rows and isa() in TILE_ISAS)
            or (xla_bf16_gemm and isa() in PANEL_COLS_ISAS and (not w_nk or tokens >= panel_min_tokens())))


# ------------------------------------------------------------------------------------------------- the op
def dense_matmul(x_MK, w, *, w_nk: bool) -> jax.Array:
    """x [M, K] (bf16 and fp32 pass as they are; other floats become fp32) times w ([N, K] if w_nk else
    [K, N], bf16 or fp32) -> fp32 [M, N]. Uses the kernel; call it only if kernel_available()."""
    x_MK, (w,) = _checked("dense_matmul", x_MK, (w,), w_nk)
    return _matmul(x_MK, w, bool(w_nk))


def dense_matmul_many(x_MK, ws, *, w_nk: bool) -> tuple[jax.Array, ...]:
    """x [M, K] times each weight of `ws` (all [N_i, K] if w_nk else [K, N_i]) -> a tuple of fp32 [M, N_i], in one
    kernel call: decode's q, k and v projections share one run of the thread pool instead of three calls, which
    XLA would run at once on the same cores. Same products and sums as dense_matmul on each weight."""
    x_MK, ws = _checked("dense_matmul_many", x_MK, tuple(ws), w_nk)
    if not ws:
        raise ValueError("dense_matmul_many: no weights")
    return _matmul_many(x_MK, ws, bool(w_nk))


def _checked(name: str, x_MK, ws: tuple, w_nk: bool):
    x_MK = jnp.asarray(x_MK)
    ws = tuple(jnp.asarray(w) for w in ws)
    layout = "[N, K]" if w_nk else "[K, N]"
    for i, w in enumerate(ws):
        which = "w" if name == "dense_matmul" else f"weight {i}"
        if x_MK.ndim != 2 or w.ndim != 2 or x_MK.shape[1] != w.shape[1 if w_nk else 0]:
            raise ValueError(f"{name}: x {x_MK.shape} and {which} {w.shape} do not fit x [M, K], w {layout}")
        if w.dtype not in (jnp.bfloat16, jnp.float32):
            raise TypeError(f"{name}: {which} must be bfloat16 or float32, got {w.dtype}")
    if x_MK.dtype not in (jnp.float32, jnp.bfloat16):
        x_MK = x_MK.astype(jnp.float32)
    loaded_library()
    return x_MK, ws


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul(x, w, w_nk):
    N = w.shape[0] if w_nk else w.shape[1]
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((x.shape[0], N), jnp.float32), vmap_method="sequential")
    return call(x, w, w_nk=np.int64(w_nk))


def _matmul_fwd(x, w, w_nk):
    return _matmul(x, w, w_nk), (x, w)


def _grads(w_nk, x, w, dy_MN):
    """(dx in fp32, dW in W's dtype) of y = x W for the cotangent dy."""
    f32 = jnp.float32
    dx = jnp.einsum("mn,nk->mk" if w_nk else "mn,kn->mk", dy_MN, w, preferred_element_type=f32)
    dw = jnp.einsum("mn,mk->nk" if w_nk else "mn,mk->kn", dy_MN, x, preferred_element_type=f32)
    return dx, dw.astype(w.dtype)


def _matmul_bwd(w_nk, res, dy_MN):
    x, w = res
    dx, dw = _grads(w_nk, x, w, dy_MN)
    return dx.astype(x.dtype), dw


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul_many(x, ws, w_nk):
    out = tuple(jax.ShapeDtypeStruct((x.shape[0], w.shape[0] if w_nk else w.shape[1]), jnp.float32) for w in ws)
    return tuple(jax.ffi.ffi_call(TARGET_MANY, out, vmap_method="sequential")(x, *ws, w_nk=np.int64(w_nk)))


def _matmul_many_fwd(x, ws, w_nk):
    return _matmul_many(x, ws, w_nk), (x, ws)


def _matmul_many_bwd(w_nk, res, dys):
    x, ws = res
    grads = [_grads(w_nk, x, w, dy) for w, dy in zip(ws, dys)]
    return sum(g[0] for g in grads).astype(x.dtype), tuple(g[1] for g in grads)


_matmul_many.defvjp(_matmul_many_fwd, _matmul_many_bwd)


# ------------------------------------------------------------------------------------------------- tuning
def set_isa(isa: str) -> str:
    """Caps the vector path ('scalar', 'avx2', 'avx512', then 'avx512bf16' and 'amx': AVX-512 plus VDPBF16PS or AMX
    tiles for prefill-sized bf16 x times bf16 [N, K]) at what the CPU and build support, or selects AMX_EMULATED (any
    CPU); returns the one in use."""
    lib = loaded_library()
    return _ISA_CODES[lib.gptoss_dense_set_isa(_ISA_CODES.index(isa))]


def isa() -> str:
    lib = load_library()
    return _ISA_CODES[lib.gptoss_dense_isa()] if lib is not None else "unavailable"


def best_isa() -> str:
    lib = load_library()
    return ISAS[lib.gptoss_dense_best_isa()] if lib is not None else "unavailable"
