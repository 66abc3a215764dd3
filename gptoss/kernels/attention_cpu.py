"""One-token (decode) attention over a KV cache (csrc/attention_decode.cc) as a jit-able JAX op, for XLA:CPU.

`decode_attention(q [B, 1, N, H], k_cache, v_cache [B, S, K, H], sinks [N], q_pos [B, 1], k_pos [B, S], *, window,
scale) -> fp32 [B, 1, N, H]`: gptoss.layers.attention.attend for one query per row (its reference twin, which the
tests hold it to), reading the cache in place. Why: for one query XLA:CPU converts and transposes the whole cache
to fp32, runs a batched dot of 8 queries per kv head and a chain of small softmax ops, and copies the cache before
updating it in place: 0.2-0.4 ms of a decode layer for ~1 MFLOP of arithmetic.

Selection (`serves`, at trace time): the model's `kernels` option allows the CPU kernels, one query per row, query
heads a multiple of the kv heads (at most 64 per kv head), head_dim <= 256, float32 or bfloat16 inputs, one JAX
device. Inference only: it has no derivative (training never attends through a KV cache).
"""

from __future__ import annotations

import ctypes
import functools
import threading

import jax
import jax.numpy as jnp
import numpy as np

from gptoss.kernels import mxfp4_cpu

TARGET = "gptoss_decode_attention"
MAX_GROUP, MAX_HEAD_DIM = 64, 256  # as in the kernel

_lock = threading.Lock()
_state: dict = {"tried": False, "lib": None, "error": None}


def load_library():
    """The shared library (loaded by mxfp4_cpu) with this op's FFI target registered, once; None if unavailable."""
    with _lock:
        if not _state["tried"]:
            _state["tried"] = True
            lib = mxfp4_cpu.load_library()
            try:
                if lib is None:
                    raise OSError(mxfp4_cpu.load_error())
                jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.GptossDecodeAttention), platform="cpu")
                lib.gptoss_decode_attention_set_isa.argtypes = [ctypes.c_int]
                _state["lib"] = lib
            except (OSError, AttributeError) as e:  # AttributeError: a library built before this kernel existed
                _state["error"] = f"{type(e).__name__}: {e}"
    return _state["lib"]


def kernel_available() -> bool:
    return load_library() is not None


def set_portable(portable: bool) -> None:
    """True: the kernel's portable task on every CPU (tests hold both tasks to the reference); False (the default):
    its AVX2 + FMA task where the CPU has it and head_dim is a multiple of 8."""
    lib = load_library()
    if lib is None:
        raise RuntimeError(f"the decode attention kernel is unavailable: {_state['error']}")
    lib.gptoss_decode_attention_set_isa(0 if portable else 1)


def serves(q_BTNH, k_BSKH, *, enabled: bool = True) -> bool:
    """Whether attention of these queries over this cache, traced now, goes to the kernel."""
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    floats = all(jnp.dtype(a.dtype) in (jnp.float32, jnp.bfloat16) for a in (q_BTNH, k_BSKH))
    return (enabled and T == 1 and floats and K > 0 and N % K == 0 and N // K <= MAX_GROUP and H <= MAX_HEAD_DIM
            and jax.device_count() == 1 and kernel_available())


def decode_attention(q_BTNH, k_BSKH, v_BSKH, sinks_N, q_pos_BT, k_pos_BS, *, window: int | None, scale: float):
    """attend(...) for T = 1 on the kernel (see the module docstring); call it only where `serves` says so."""
    if load_library() is None:
        raise RuntimeError(f"the decode attention kernel is unavailable: {_state['error']}")
    if k_BSKH.dtype != v_BSKH.dtype:
        v_BSKH = v_BSKH.astype(k_BSKH.dtype)
    return _attend(q_BTNH, k_BSKH, v_BSKH, sinks_N, q_pos_BT.astype(jnp.int32), k_pos_BS.astype(jnp.int32),
                   int(window or 0), float(scale))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _attend(q, k, v, sinks, q_pos, k_pos, window, scale):
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32), vmap_method="sequential")
    return call(q, k, v, sinks, q_pos, k_pos, window=np.int64(window), scale=np.float32(scale))


def _attend_fwd(q, k, v, sinks, q_pos, k_pos, window, scale):
    return _attend(q, k, v, sinks, q_pos, k_pos, window, scale), None


def _attend_bwd(window, scale, res, do):
    raise NotImplementedError("the decode attention kernel has no derivative; differentiate with kernels='xla'")


_attend.defvjp(_attend_fwd, _attend_bwd)
