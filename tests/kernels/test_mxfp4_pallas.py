"""The MXFP4 Pallas kernels in interpret mode against the numpy dequantizer and their XLA twins (odd sizes, tails,
experts without rows, skipped pairs, top-k ties, bf16 and fp32); the expert op and its gradient on them; the
`kernels` option choosing them on a (mocked) GPU, and falling back with one warning when they do not compile."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptoss.kernels import select
from gptoss.kernels.mxfp4_pallas import mx_gather_pallas, mx_grouped_pallas, tile_layout
from gptoss.layers.experts import ExpertWeights, moe_ffn
from gptoss.layers.grouped import grouped_matmul
from gptoss.quant import MXFP4Array, unpack_ref

HI = jax.lax.Precision.HIGHEST
E, N, K = 5, 24, 96  # N = 24: N tiles of 8 (the largest power of two dividing it); K = 96: 3 MX blocks


def _packed(rng, e=E, n=N, k=K, dtype=jnp.float32):
    blocks = rng.integers(0, 256, (e, n, k // 32, 16), dtype=np.uint8)
    scales = rng.integers(110, 140, (e, n, k // 32), dtype=np.uint8)
    scales.flat[::7] = 0  # the subnormal scale 2**-127
    return MXFP4Array(jnp.asarray(blocks), jnp.asarray(scales), dtype), unpack_ref(blocks, scales).astype(np.float64)


def _x(rng, rows, dtype):
    x = jnp.asarray(rng.normal(size=(rows, K)), dtype)
    return x, np.asarray(x.astype(jnp.float32), np.float64)


@pytest.mark.parametrize("pattern, dtype", [("random", jnp.float32), ("skipped", jnp.float32),
                                            ("ties", jnp.bfloat16), ("all_skipped", jnp.bfloat16)])
def test_gather_matches_numpy(pattern, dtype):
    rng = np.random.default_rng(hash(pattern) % 1000)
    w, W = _packed(rng)
    M, S = 7, 3
    idx = {"random": rng.integers(0, E, (M, S)), "ties": np.repeat(rng.integers(0, E, (M, 1)), S, axis=1),
           "skipped": np.where(rng.random((M, S)) < 0.4, -1, rng.integers(0, E, (M, S))),
           "all_skipped": np.full((M, S), -1)}[pattern]
    x, x64 = _x(rng, M, dtype)
    got = np.asarray(mx_gather_pallas(x, w, jnp.asarray(idx, jnp.int32), block_n=16))
    keep = idx >= 0
    want = np.einsum("msnk,mk->msn", W[np.where(keep, idx, 0)], x64) * keep[..., None]
    bound = 1e-5 * np.einsum("msnk,mk->msn", np.abs(W[np.where(keep, idx, 0)]), np.abs(x64)) + 1e-30
    assert got.shape == (M, S, N) and got.dtype == np.float32
    assert np.all(np.abs(got - want) <= bound), np.max(np.abs(got - want) / bound)
    assert not got[~keep].any()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_grouped_matches_numpy_and_xla_twin(dtype):
    """Counts with empty experts, groups not multiples of the 16-row tile, 3 trailing rows past sum(counts)."""
    rng = np.random.default_rng(4)
    w, W = _packed(rng)
    counts = np.array([17, 0, 5, 0, 12])
    A = counts.sum() + 3
    x, x64 = _x(rng, A, dtype)
    got = np.asarray(mx_grouped_pallas(x, w, jnp.asarray(counts), block_m=16, block_n=16))
    expert = np.repeat(np.arange(E), counts)
    want = np.zeros((A, N))
    want[: len(expert)] = np.einsum("ank,ak->an", W[expert], x64[: len(expert)])
    bound = np.zeros((A, N)) + 1e-30
    bound[: len(expert)] += 1e-5 * np.einsum("ank,ak->an", np.abs(W[expert]), np.abs(x64[: len(expert)]))
    assert np.all(np.abs(got - want) <= bound), np.max(np.abs(got - want) / bound)
    twin = np.asarray(grouped_matmul(x, w, jnp.asarray(counts), precision=HI))
    np.testing.assert_allclose(got, twin, rtol=1e-5, atol=1e-5 * np.abs(twin).max())


def test_tile_layout():
    counts = np.array([3, 0, 9, 1])
    rows, bm = 15, 4  # 13 grouped rows + 2 past the groups
    dest, tile_expert = (np.asarray(a) for a in tile_layout(jnp.asarray(counts), rows, bm))
    # by hand: expert 0 -> tile 0 (rows 0..2), expert 2 -> tiles 1..3 (rows 4..12), expert 3 -> tile 4 (row 16)
    np.testing.assert_array_equal(dest, [0, 1, 2, 4, 5, 6, 7, 8, 9, 10, 11, 12, 16, 32, 32])
    np.testing.assert_array_equal(tile_expert, [0, 2, 2, 2, 3, -1, -1, -1])


@pytest.mark.parametrize("impl", ["gather", "grouped"])
def test_expert_op_and_input_gradient_on_pallas(impl):
    """moe_ffn with the Pallas kernels = the dense XLA reference, values and d/dx, d/dweights (routing)."""
    rng = np.random.default_rng(7)
    D, I = K, 32
    gu, _ = _packed(rng, E, 2 * I, D)
    dn, _ = _packed(rng, E, D, I)
    ew = ExpertWeights(gu, jnp.asarray(rng.normal(size=(E, 2 * I)), jnp.float32), dn,
                       jnp.asarray(rng.normal(size=(E, D)), jnp.float32))
    T, top = 6, 2
    x = jnp.asarray(rng.normal(size=(T, D)) * 0.1, jnp.float32)
    idx = jnp.asarray(np.c_[rng.integers(0, E, T), np.r_[rng.integers(0, E, T - 1), -1]], jnp.int32)
    wts = jnp.asarray(rng.random((T, top)), jnp.float32)

    def f(pallas, x, wts, moe_impl):
        return jnp.sum(moe_ffn(x, idx, wts, ew, moe_impl=moe_impl, pallas=pallas, precision=HI) ** 2)

    ref, g_ref = jax.value_and_grad(f, argnums=(1, 2))(False, x, wts, "dense")
    got, g = jax.value_and_grad(f, argnums=(1, 2))(True, x, wts, impl)
    np.testing.assert_allclose(float(got), float(ref), rtol=1e-5)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    jaxpr = str(jax.make_jaxpr(lambda x: f(True, x, wts, impl))(x))
    assert "pallas_call" in jaxpr


# ------------------------------------------------------------------------------------------- backend selection
@pytest.fixture
def fresh_select(monkeypatch):
    monkeypatch.setattr(select, "_warned", {"done": False})
    monkeypatch.setattr(select, "_probe", {})
    return monkeypatch


def test_auto_picks_pallas_on_gpu(fresh_select):
    fresh_select.setattr(jax, "default_backend", lambda: "gpu")
    fresh_select.setattr(select, "_compile_probe", lambda: (True, None))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert select.pallas_kernels("auto") and not select.cpu_kernels("auto")
    assert not select.pallas_kernels("xla")


def test_auto_falls_back_to_xla_with_one_warning(fresh_select):
    fresh_select.setattr(jax, "default_backend", lambda: "gpu")
    fresh_select.setattr(select, "_compile_probe", lambda: (False, "mx_grouped: LoweringError: nope"))
    with pytest.warns(select.KernelUnavailableWarning, match="mx_grouped: LoweringError"):
        assert not select.pallas_kernels("auto")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not select.pallas_kernels("auto")  # once


def test_pallas_choice_per_backend(fresh_select):
    assert select.pallas_kernels("pallas")  # CPU: interpret mode
    assert not select.pallas_kernels("auto")  # CPU: never by default
    fresh_select.setattr(jax, "default_backend", lambda: "tpu")
    assert not select.pallas_kernels("auto")
    with pytest.raises(RuntimeError, match="GPUs"):
        select.pallas_kernels("pallas")


def test_compile_probe_runs_here():
    """The probe itself works (on CPU it compiles the kernels in interpret mode)."""
    assert select._compile_probe() == (True, None)
