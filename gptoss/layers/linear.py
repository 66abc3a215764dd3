"""`project(spec, x, w)`: a weight projection written as an einsum, sent to the dense bf16 CPU kernel when it wins.

XLA:CPU converts a whole bf16 weight to fp32 on every call when only a few tokens multiply it, so decode-sized
projections with bf16 weights go to gptoss.kernels.dense_cpu (when the model's `kernels` option allows the CPU
kernels and `dense_cpu.serves`), as does the unembedding at any length on CPUs with AMX or AVX512_BF16 tiles;
everything else, and the reference twin, is the plain `jnp.einsum` (bf16 x bf16 asked for an fp32 result, XLA's
fast case). Both give the einsum's result dtype.

A weight packed as bf12 (gptoss.quant.bf12, frozen dense weights for CPU decode) goes to gptoss.kernels.bf12_cpu
where that serves (bf16 x on one CPU device: decode's few tokens, and prefill where the CPU has bf16 tiles);
elsewhere it is unpacked to its exact bf16 bits first (by the kernel library when it loaded, else in XLA).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from gptoss.kernels import bf12_cpu, dense_cpu
from gptoss.quant.bf12 import BF12Array


class Plan(NamedTuple):
    """How an einsum maps onto x [M, K] . W: x's leading `batch` dims are tokens, its other dims contract."""

    batch: int
    w_nk: bool  # W's contracted dims come last ([out..., in...]); else first ([in..., out...])


@functools.lru_cache(maxsize=256)
def plan(spec: str) -> Plan | None:
    """The Plan for `spec` ("btd,dnh->btnh"), or None if it is not a plain projection of x's trailing dims."""
    try:
        inputs, out = spec.replace(" ", "").split("->")
        a, b = inputs.split(",")
    except ValueError:
        return None
    if "." in spec or any(len(set(s)) != len(s) for s in (a, b, out)):
        return None
    contracted = "".join(c for c in a if c in b and c not in out)
    batch = a[: len(a) - len(contracted)]
    if not contracted or a != batch + contracted or any(c in b for c in batch):
        return None
    for w_nk, w_out in ((False, b[len(contracted):]), (True, b[: len(b) - len(contracted)])):
        if (b == contracted + w_out if not w_nk else b == w_out + contracted) and out == batch + w_out:
            return Plan(len(batch), w_nk)
    return None


def project(spec: str, x, w, *, preferred_element_type=None, precision=None, kernels: bool = False):
    """`jnp.einsum(spec, x, w, preferred_element_type=..., precision=...)`, computed by the dense CPU kernel when
    `kernels` (the model's choice allows the CPU kernels) and the kernel serves this size and dtype."""
    if isinstance(w, BF12Array):
        return project_many((spec,), x, (w,), precision=precision, kernels=kernels,
                            preferred_element_type=preferred_element_type)[0]
    out_dtype = jnp.dtype(preferred_element_type or jnp.result_type(x, w))
    bf16 = x.dtype == w.dtype == jnp.bfloat16
    p = plan(spec)
    if p is not None and x.ndim - p.batch > 1:
        # Several contracted dims ("btnh,nhd->btd") become one: XLA:CPU otherwise lays the dot out by transposing
        # the whole weight on every call (wo, 23.6 MB: ~10 ms per layer of a 128-token prefill).
        spec, x, w = _merge_contracted(spec, p, x, w)
        p = plan(spec)
    if p is not None and kernels and _kernel_serves(p, x, w):
        return _kernel(p, x, w, out_dtype)
    if bf16 and p is not None and out_dtype in (jnp.bfloat16, jnp.float32):
        # XLA:CPU runs bf16 x bf16 -> fp32 as a native bf16 GEMM, while a bf16 result (or an fp32 operand) makes it
        # convert the whole weight to fp32 first (~4x slower at prefill sizes); _bf16_einsum keeps its backward so
        return _bf16_einsum(spec, x, w, precision).astype(out_dtype)
    return jnp.einsum(spec, x, w, preferred_element_type=preferred_element_type, precision=precision)


def project_many(specs, x, ws, *, precision=None, kernels: bool = False, preferred_element_type=None) -> list:
    """[project(spec, x, w) for each pair], as one dense-kernel call when the kernel serves every one of them with
    the same token dims and weight layout (decode's q, k and v: one run of the kernel's thread pool instead of three
    calls that XLA would run at once on the same cores); otherwise the projections one by one. The same for weights
    that are all bf12 (one bf12 kernel call)."""
    plans = [plan(spec) for spec in specs]
    p = plans[0]
    if any(isinstance(w, BF12Array) for w in ws):
        return _project_bf12(specs, plans, x, ws, precision, kernels, preferred_element_type)
    if (kernels and p is not None and all(q == p for q in plans) and x.ndim - p.batch == 1
            and all(_kernel_serves(p, x, w) for w in ws)):
        K = x.shape[-1]
        w2s = [w.reshape((-1, K) if p.w_nk else (K, -1)) for w in ws]
        ys = dense_cpu.dense_matmul_many(x.reshape(-1, K), w2s, w_nk=p.w_nk)
        return [_unflatten(p, x, w, y, jnp.result_type(x, w)) for w, y in zip(ws, ys)]
    return [project(spec, x, w, precision=precision, kernels=kernels) for spec, w in zip(specs, ws)]


def _project_bf12(specs, plans, x, ws, precision, kernels: bool, preferred_element_type) -> list:
    """project_many where some weights are bf12: the bf12 kernel when it serves them all (each w [*out, *in] with x's
    trailing dims as its `in`), else each one unpacked to bf16 and projected as usual."""
    p = plans[0]
    if (kernels and p is not None and all(q == p for q in plans) and p.w_nk
            and all(isinstance(w, BF12Array) and w.n_in == x.ndim - p.batch for w in ws)
            and bf12_cpu.serves(math.prod(x.shape[: p.batch]), x)):
        K = math.prod(x.shape[p.batch:])
        ys = bf12_cpu.matmul_many(x.reshape(-1, K), ws)
        out_dtype = jnp.dtype(preferred_element_type or x.dtype)
        return [y.reshape(*x.shape[: p.batch], *w.shape[: w.ndim - w.n_in]).astype(out_dtype) for w, y in zip(ws, ys)]
    unpack = bf12_cpu.unpack if kernels and jax.device_count() == 1 and bf12_cpu.kernel_available() else None
    ws = [(unpack(w) if unpack else w.unpack()) if isinstance(w, BF12Array) else w for w in ws]
    return [project(spec, x, w, precision=precision, kernels=kernels, preferred_element_type=preferred_element_type)
            for spec, w in zip(specs, ws)]


def _kernel_serves(p: Plan, x, w) -> bool:
    """Whether the dense kernel takes x times w (planned as p) at this size and dtype (dense_cpu.serves)."""
    bf16 = x.dtype == w.dtype == jnp.bfloat16
    K = math.prod(x.shape[p.batch:])
    return dense_cpu.serves(math.prod(x.shape[: p.batch]), w, xla_bf16_gemm=bf16, w_nk=p.w_nk,
                            tile_rows=bf16 and p.w_nk and K % 32 == 0)


def _merge_contracted(spec: str, p: Plan, x, w):
    """The same projection with x's contracted dims (and w's) merged into one; free reshapes of row-major arrays."""
    (a, b), out = spec.replace(" ", "").split("->")[0].split(","), spec.replace(" ", "").split("->")[1]
    n_k = x.ndim - p.batch
    k = next(c for c in "abcdefghijklmnopqrstuvwxyz" if c not in spec)
    K = math.prod(x.shape[p.batch:])
    x = x.reshape(*x.shape[: p.batch], K)
    if p.w_nk:
        w, b = w.reshape(*w.shape[: w.ndim - n_k], K), b[: len(b) - n_k] + k
    else:
        w, b = w.reshape(K, *w.shape[n_k:]), k + b[n_k:]
    return f"{a[: p.batch]}{k},{b}->{out}", x, w


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def _bf16_einsum(spec: str, x, w, precision):
    """bf16 x bf16 -> fp32 einsum whose backward is two more bf16 x bf16 -> fp32 einsums. Plain autodiff would
    multiply the fp32 cotangent by the bf16 weight: an fp32 copy of every weight, kept from the forward to the
    backward of a training step (~0.1 GiB a layer at gpt-oss-20b widths), and fp32 GEMMs. The cotangent is
    rounded to bf16 instead, as bf16 mixed-precision training does everywhere."""
    return jnp.einsum(spec, x, w, preferred_element_type=jnp.float32, precision=precision)


def _bf16_einsum_fwd(spec, x, w, precision):
    return _bf16_einsum(spec, x, w, precision), (x, w)


def _bf16_einsum_bwd(spec, precision, res, ct):
    x, w = res
    (a, b), out = spec.replace(" ", "").split("->")[0].split(","), spec.replace(" ", "").split("->")[1]
    ct = ct.astype(jnp.bfloat16)
    dx = jnp.einsum(f"{out},{b}->{a}", ct, w, preferred_element_type=jnp.float32, precision=precision)
    dw = jnp.einsum(f"{a},{out}->{b}", x, ct, preferred_element_type=jnp.float32, precision=precision)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_bf16_einsum.defvjp(_bf16_einsum_fwd, _bf16_einsum_bwd)


def _kernel(p: Plan, x, w, out_dtype):
    K = math.prod(x.shape[p.batch:])
    w2 = w.reshape((-1, K) if p.w_nk else (K, -1))
    y_MN = dense_cpu.dense_matmul(x.reshape(math.prod(x.shape[: p.batch]), K), w2, w_nk=p.w_nk)
    return _unflatten(p, x, w, y_MN, out_dtype)


def _unflatten(p: Plan, x, w, y_MN, out_dtype):
    """The kernel's [M, N] result in the einsum's output shape (x's token dims, then w's output dims) and dtype."""
    n_k = x.ndim - p.batch
    out_shape = w.shape[: w.ndim - n_k] if p.w_nk else w.shape[n_k:]
    return y_MN.reshape(*x.shape[: p.batch], *out_shape).astype(out_dtype)
