"""grouped_matmul against its reference twin jax.lax.ragged_dot (a different algorithm: every row against every
group, masked), values and gradients, for dense and packed experts, every tile size, empty groups and rows left
over past the groups (skipped pairs)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptoss.layers.grouped import grouped_matmul
from gptoss.quant import quantize

HIGHEST = jax.lax.Precision.HIGHEST


def ragged_twin(x, w_ENK, counts):
    """ragged_dot takes rhs [G, K, N]; rows past sum(counts) are left out and set to zero here explicitly."""
    y = jax.lax.ragged_dot(x, jnp.swapaxes(w_ENK, 1, 2), counts, precision=HIGHEST)
    return jnp.where((jnp.arange(x.shape[0]) < counts.sum())[:, None], y, 0.0)


def case(seed, E, N, K, counts, extra):
    rng = np.random.default_rng(seed)
    A = sum(counts) + extra
    x = jnp.asarray(rng.normal(size=(A, K)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(E, N, K)) * K**-0.5, jnp.float32)
    return x, w, jnp.asarray(counts, jnp.int32)


CASES = [  # (E, counts, rows past the groups); the default tile is 8 for all of them
    (1, [5], 3),
    (3, [4, 0, 9], 2),
    (5, [0, 1, 0, 17, 2], 0),
    (4, [0, 0, 0, 0], 5),
]


@pytest.mark.parametrize("tile", [1, None])
@pytest.mark.parametrize("E, counts, extra", CASES)
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "mxfp4"])
def test_values_and_gradients_equal_ragged_dot(E, counts, extra, tile, packed):
    x, w, counts = case(E + len(counts), E, 40, 64, counts, extra)
    probe = jnp.asarray(np.random.default_rng(1).normal(size=(x.shape[0], 40)), jnp.float32)
    if packed:
        qw = quantize(w, jnp.float32)
        w_ref = qw.dequantize(jnp.float32)

        def ours(x):
            return grouped_matmul(x, qw, counts, tile=tile, precision=HIGHEST)
    else:
        w_ref = w

        def ours(x, w):
            return grouped_matmul(x, w, counts, tile=tile, precision=HIGHEST)

    args = (x,) if packed else (x, w)
    ref_args = (x, w_ref)
    got, want = jax.jit(ours)(*args), jax.jit(ragged_twin)(*ref_args, counts)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(got)[int(counts.sum()):] == 0)
    argnums = (0,) if packed else (0, 1)
    g = jax.jit(jax.grad(lambda *a: jnp.sum(jnp.tanh(ours(*a)) * probe), argnums=argnums))(*args)
    g_ref = jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.tanh(ragged_twin(x, w, counts)) * probe),
                             argnums=argnums))(*ref_args)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5 * float(np.abs(b).max() + 1e-30))


def test_bad_shapes_are_named():
    x, w, counts = case(0, 3, 8, 32, [1, 2, 3], 0)
    with pytest.raises(ValueError, match="grouped_matmul"):
        grouped_matmul(x[:, :16], w, counts)
