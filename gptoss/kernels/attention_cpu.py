"""One decode step of attention (RoPE, KV cache write, attention; csrc/attention_decode.cc) as a jit-able JAX op, for
XLA:CPU.

`decode_attention(q [B, 1, N, H], k, v [B, 1, K, H] (before RoPE), cos, sin [B, 1, H/2], k_cache, v_cache [B, S, K, H],
k_pos [B, S], sinks [N], q_pos [B, 1], *, window, scale, ring) -> (fp32 [B, 1, N, H], k_cache, v_cache, k_pos)`:
gptoss.layers.attention's decode step (apply_rope, LayerCache.write, attend; its reference twin, which the tests hold
it to), with the caches updated in place (aliased). Why: for one query XLA:CPU converts and transposes the whole
cache to fp32, runs a batched dot of 8 queries per kv head and a chain of small softmax ops (0.2-0.4 ms of a decode
layer for ~1 MFLOP of arithmetic); its cache write became a loop over the whole cache (a convert fused into the
update keeps it from being in place) followed by a copy, and each layer recomputed cos and sin per element of q.

Selection (`serves`, at trace time): the model's `kernels` option allows the CPU kernels, one query per row, query
heads a multiple of the kv heads (at most 64 per kv head), an even head_dim <= 256, float32 or bfloat16 inputs, one
JAX device. Inference only: it has no derivative (training never attends through a KV cache).
"""

from __future__ import annotations

import ctypes
import functools

import jax
import jax.numpy as jnp
import numpy as np

from gptoss.kernels import mxfp4_cpu

TARGET = "gptoss_decode_attention"
MAX_GROUP, MAX_HEAD_DIM = 64, 256  # as in the kernel


def _setup(lib) -> None:
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.GptossDecodeAttention), platform="cpu")
    lib.gptoss_decode_attention_set_isa.argtypes = [ctypes.c_int]


_family = mxfp4_cpu.KernelFamily(_setup)


def load_library():
    """The shared library (loaded by mxfp4_cpu) with this op's FFI target registered, once; None if unavailable."""
    return _family.load()


def kernel_available() -> bool:
    return load_library() is not None


def set_portable(portable: bool) -> None:
    """True: the kernel's portable task on every CPU (tests hold both tasks to the reference); False (the default):
    its AVX2 + FMA task where the CPU has it and head_dim is a multiple of 8."""
    lib = load_library()
    if lib is None:
        raise RuntimeError(f"the decode attention kernel is unavailable: {_family.error}")
    lib.gptoss_decode_attention_set_isa(0 if portable else 1)


def serves(q_BTNH, k_BSKH, *, enabled: bool = True) -> bool:
    """Whether a decode step of these queries over this cache, traced now, goes to the kernel."""
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    floats = all(jnp.dtype(a.dtype) in (jnp.float32, jnp.bfloat16) for a in (q_BTNH, k_BSKH))
    return (enabled and T == 1 and floats and K > 0 and N % K == 0 and N // K <= MAX_GROUP and H % 2 == 0
            and H <= MAX_HEAD_DIM and jax.device_count() == 1 and kernel_available())


def decode_attention(q_BTNH, k_BTKH, v_BTKH, cos_BTh, sin_BTh, k_cache_BSKH, v_cache_BSKH, k_pos_BS, sinks_N, q_pos_BT,
                     *, window: int | None, scale: float, ring: bool):
    """The decode step on the kernel (see the module docstring); call it only where `serves` says so. Returns
    (attention output fp32 [B, 1, N, H], k cache, v cache, k_pos)."""
    if load_library() is None:
        raise RuntimeError(f"the decode attention kernel is unavailable: {_family.error}")
    if v_BTKH.dtype != k_BTKH.dtype:
        v_BTKH = v_BTKH.astype(k_BTKH.dtype)
    if v_cache_BSKH.dtype != k_cache_BSKH.dtype:
        raise ValueError(f"decode attention: the k cache is {k_cache_BSKH.dtype}, the v cache {v_cache_BSKH.dtype}")
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    return _step(q_BTNH, k_BTKH, v_BTKH, f32(cos_BTh), f32(sin_BTh), k_cache_BSKH, v_cache_BSKH,
                 k_pos_BS.astype(jnp.int32), sinks_N, q_pos_BT.astype(jnp.int32), int(window or 0), float(scale),
                 bool(ring))


@functools.partial(jax.custom_vjp, nondiff_argnums=(10, 11, 12))
def _step(q, k, v, cos, sin, k_cache, v_cache, k_pos, sinks, q_pos, window, scale, ring):
    shapes = (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
              jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype), jax.ShapeDtypeStruct(k_pos.shape, jnp.int32))
    call = jax.ffi.ffi_call(TARGET, shapes, vmap_method="sequential", input_output_aliases={5: 1, 6: 2, 7: 3})
    return tuple(call(q, k, v, cos, sin, k_cache, v_cache, k_pos, sinks, q_pos, window=np.int64(window),
                      scale=np.float32(scale), ring=np.int64(ring)))


def _step_fwd(*args):
    return _step(*args), None


def _step_bwd(window, scale, ring, res, do):
    raise NotImplementedError("the decode attention kernel has no derivative; differentiate with kernels='xla'")


_step.defvjp(_step_fwd, _step_bwd)
