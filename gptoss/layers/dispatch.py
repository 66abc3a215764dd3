"""MoE strategies: how the (token, expert) pairs of a layer are laid out as rows, and what multiplies them.

Each strategy is a `Rows` object with four operations that `gptoss.layers.experts.moe_ffn` composes:
`matmul_in(x_TD, W)` (token rows times each pair's expert), `matmul(rows, W)` (pair rows times their experts),
`take(b_EN)` (each row's expert bias) and `combine(y_rows, w_TK)` (the routing-weighted sum per token). W is
[E, N, K] (the checkpoint's [out, in]), dense or packed; matmuls return float32.

* `DenseRows`   [E, T, .]: every expert on every token, unselected ones weighted 0. The slow, obvious reference.
* `GatherRows`  [T*K, .] in token order: each pair multiplies its own (gathered, still packed) expert. Decode.
* `GroupedRows` [T*K, .] sorted by expert: each expert is dequantized once and multiplies its rows in tiles
                (gptoss.layers.grouped.grouped_matmul, differentiable). Prefill and training.

Skipped pairs (negative expert index) contribute zero. With `cpu_kernels`, packed experts in the gather and
grouped layouts go to the MXFP4 CPU kernel (which does no work for skipped pairs); with `pallas`, to the Pallas
kernels (gptoss.kernels.mxfp4_pallas; GPUs); everything else, and the reference twin of the kernels, is XLA.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gptoss.kernels import mxfp4_cpu, mxfp4_pallas
from gptoss.layers.grouped import grouped_matmul, zeros_after
from gptoss.manual_axes import varying_like
from gptoss.quant import MXFP4Array, as_dense

F32 = jnp.float32


def acc(dtype):
    """The accumulation dtype for operands of `dtype`: float32, or float64 for float64 operands (x64 tests)."""
    return jnp.promote_types(F32, dtype)


def make_rows(strategy: str, idx_TK, num_experts: int, *, cpu_kernels: bool = False, pallas: bool = False,
              precision=None):
    cls = {"dense": DenseRows, "gather": GatherRows, "grouped": GroupedRows}[strategy]
    return cls(idx_TK, num_experts, cpu_kernels=cpu_kernels, pallas=pallas, precision=precision)


class Rows:
    def __init__(self, idx_TK, num_experts: int, *, cpu_kernels: bool = False, pallas: bool = False,
                 precision=None):
        self.idx_TK = jnp.asarray(idx_TK, jnp.int32)
        self.T, self.K = self.idx_TK.shape
        self.E = num_experts
        self.kernels = cpu_kernels
        self.pallas = pallas
        self.precision = precision

    def _kernel(self, w) -> bool:
        return self.kernels and isinstance(w, MXFP4Array)

    def _pallas(self, w, x) -> bool:
        return self.pallas and mxfp4_pallas.supports(w) and x.dtype in (jnp.float32, jnp.bfloat16)

    def _einsum(self, spec, x, w):
        return jnp.einsum(spec, x, w, preferred_element_type=acc(x.dtype), precision=self.precision)


class DenseRows(Rows):
    """Rows [E, T, .]: expert e's copy of every token."""

    def matmul_in(self, x_TD, w):
        return self._einsum("td,end->etn", x_TD, as_dense(w, x_TD.dtype))

    def matmul(self, r_ETK, w):
        return self._einsum("etk,enk->etn", r_ETK, as_dense(w, r_ETK.dtype))

    def take(self, b_EN):
        return b_EN[:, None, :].astype(acc(b_EN.dtype))

    def combine(self, y_ETD, w_TK):
        # one_hot of a negative (skipped) index is all zeros
        w_TK = w_TK.astype(y_ETD.dtype)
        combine_TE = jnp.sum(jax.nn.one_hot(self.idx_TK, self.E, dtype=w_TK.dtype) * w_TK[..., None], axis=1)
        return jnp.einsum("te,etd->td", combine_TE, y_ETD, precision=self.precision)


class GatherRows(Rows):
    """Rows [T*K, .]: pair (t, k) at row t*K + k, multiplied by its own gathered expert."""

    def __init__(self, idx_TK, num_experts, **kw):
        super().__init__(idx_TK, num_experts, **kw)
        self.live_TK = self.idx_TK >= 0
        self.safe_TK = jnp.maximum(self.idx_TK, 0)  # skipped pairs compute on expert 0 and are masked out

    def matmul_in(self, x_TD, w):
        if self._kernel(w):
            y = mxfp4_cpu.mx_gather_matmul(x_TD, w, self.idx_TK, grouped=False)
        elif self._pallas(w, x_TD):
            y = mxfp4_pallas.mx_gather_pallas(x_TD, w, self.idx_TK)
        else:
            y = self._einsum("td,tknd->tkn", x_TD, _take(w, self.safe_TK, x_TD.dtype))
        return y.reshape(self.T * self.K, -1)

    def matmul(self, r_AK, w):
        if self._kernel(w):
            return mxfp4_cpu.mx_gather_matmul(r_AK, w, self.idx_TK.reshape(-1, 1), grouped=False)[:, 0]
        if self._pallas(w, r_AK):
            return mxfp4_pallas.mx_gather_pallas(r_AK, w, self.idx_TK.reshape(-1, 1))[:, 0]
        return self._einsum("ak,ank->an", r_AK, _take(w, self.safe_TK.reshape(-1), r_AK.dtype))

    def take(self, b_EN):
        return b_EN[self.safe_TK.reshape(-1)].astype(acc(b_EN.dtype))

    def combine(self, y_AD, w_TK):
        live = self.live_TK
        y_TKD = jnp.where(live[..., None], y_AD.reshape(self.T, self.K, -1), 0.0)
        return jnp.einsum("tk,tkd->td", jnp.where(live, w_TK, 0.0).astype(y_AD.dtype), y_TKD, precision=self.precision)


class GroupedRows(Rows):
    """Rows [T*K, .] sorted by expert (stable; skipped pairs last): expert e owns counts[e] consecutive rows."""

    def __init__(self, idx_TK, num_experts, tile: int | None = None, **kw):
        super().__init__(idx_TK, num_experts, **kw)
        key = jnp.where(self.idx_TK < 0, self.E, self.idx_TK).reshape(-1)  # skipped pairs sort after every expert
        # (argsort's result loses the mesh axes its keys vary over inside shard_map; varying_like restores them, or a
        # custom VJP would sum other devices' rows into this one's gradient)
        self.order = varying_like(jnp.argsort(key, stable=True), key)
        self.expert = key[self.order]  # E on skipped rows
        self.token = self.order // self.K
        self.counts = jnp.zeros((self.E,), jnp.int32).at[key].add(1, mode="drop")
        self.tile = tile

    def matmul_in(self, x_TD, w):
        return self.matmul(x_TD[self.token], w)

    def matmul(self, r_AK, w):
        if self._kernel(w):
            skipped_as_negative = jnp.where(self.expert < self.E, self.expert, -1)
            return mxfp4_cpu.mx_gather_matmul(r_AK, w, skipped_as_negative[:, None], grouped=True)[:, 0]
        return grouped_matmul(r_AK, w, self.counts, tile=self.tile, precision=self.precision, pallas=self.pallas)

    def take(self, b_EN):
        return jnp.take(b_EN, self.expert, axis=0, mode="fill", fill_value=0).astype(acc(b_EN.dtype))

    def combine(self, y_AD, w_TK):
        w_A = jnp.where(self.expert < self.E, w_TK.reshape(-1)[self.order], 0.0).astype(y_AD.dtype)
        # (segment_sum's zeros would be scheduled at program start by XLA:CPU, alive through every layer)
        return zeros_after((self.T, y_AD.shape[1]), y_AD.dtype, y_AD).at[self.token].add(y_AD * w_A[:, None])


def _take(w, idx, dtype):
    """w[idx] for an index array (a leading axis of experts), dequantized if packed."""
    if isinstance(w, MXFP4Array):
        return w.take(idx).dequantize(dtype)
    return jnp.take(w, idx, axis=0).astype(dtype)
