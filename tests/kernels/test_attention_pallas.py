"""The flash-attention Pallas kernel in interpret mode against the float64 numpy oracle and its XLA twin
(gptoss.layers.flash.attend_flash): prefill with padding, windows smaller and larger than a block, a shuffled cache
prefix with empty slots, decode against a ring, rows that see nothing, extreme sinks; fp32 and bf16."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_ref import attend_ref

from gptoss.kernels.attention_pallas import flash_attend_pallas
from gptoss.layers.flash import attend_flash

HI = jax.lax.Precision.HIGHEST
B, N, K, H = 2, 6, 2, 8  # G = 3 query heads per kv head; head dim 8


def _case(name, rng):
    """(q, k, v, sinks, q_pos, k_pos, window) for one edge case."""
    if name in ("prefill", "prefill_window", "prefill_wide_window"):
        T = 37
        q_pos = np.tile(np.arange(T), (B, 1))
        q_pos[1, 30:] = -1  # row 1: a 30-token prompt, right-padded
        k_pos = q_pos
        window = {"prefill": None, "prefill_window": 5, "prefill_wide_window": 20}[name]
    elif name == "cache_prefix":  # 13 cache slots (shuffled earlier positions, 3 empty) + an 11-token chunk
        P, T = 13, 11
        cache = np.stack([rng.permutation(np.r_[np.arange(P - 3), -np.ones(3, int)]) for _ in range(B)])
        q_pos = np.tile(np.arange(P - 3, P - 3 + T), (B, 1))
        k_pos = np.concatenate([cache, q_pos], axis=1)
        window = 6
    elif name == "decode_ring":  # one query against a ring of 8 slots holding positions 35..42 out of order
        T = 1
        k_pos = np.stack([np.roll(np.arange(35, 43), 3), np.r_[np.arange(5), -np.ones(3, int)]])
        q_pos = np.array([[42], [4]])
        window = 8
    elif name == "sees_nothing":  # a padded query row and a row whose keys are all in its future
        T = 4
        q_pos = np.array([[-1, 0, 1, 2], [0, 1, 2, 3]])
        k_pos = np.array([[0, 1, 2, 3], [10, 11, 12, 13]])
        window = None
    else:
        raise ValueError(name)
    S = k_pos.shape[1]
    q = rng.normal(size=(B, T, N, H)).astype(np.float32)
    k = rng.normal(size=(B, S, K, H)).astype(np.float32)
    v = rng.normal(size=(B, S, K, H)).astype(np.float32)
    sinks = rng.normal(size=N).astype(np.float32) * 2
    sinks[0], sinks[1] = 30.0, -30.0  # a sink that takes all the mass, one that takes none
    return q, k, v, sinks, q_pos.astype(np.int32), k_pos.astype(np.int32), window


CASES = ("prefill", "prefill_wide_window", "cache_prefix", "decode_ring", "sees_nothing")


@pytest.mark.parametrize("name", CASES)
def test_kernel_matches_numpy_and_xla_twin_fp32(name):
    q, k, v, sinks, q_pos, k_pos, window = _case(name, np.random.default_rng(CASES.index(name)))
    want = attend_ref(q, k, v, sinks, q_pos, k_pos, window, H**-0.5)
    # blocks of 16 rows (5 tokens x 3 heads, not aligned to tokens) and 8 keys: several of each, ragged tails
    got = flash_attend_pallas(q, k, v, sinks, q_pos, k_pos, window=window, scale=H**-0.5, precision=HI,
                              block_q=16, block_k=8)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5, err_msg=name)
    twin = attend_flash(q, k, v, sinks, q_pos, k_pos, window=window, scale=H**-0.5, precision=HI,
                        block_q=4, block_k=8)
    np.testing.assert_allclose(np.asarray(got), np.asarray(twin), rtol=1e-5, atol=1e-6, err_msg=name)
    if name == "sees_nothing":
        assert not np.asarray(got)[0, 0].any() and not np.asarray(got)[1].any()


def test_kernel_bf16_inputs():
    """bf16 q/k/v: bf16 products with fp32 accumulation (the GPU's tensor-core path) stay close to fp64."""
    q, k, v, sinks, q_pos, k_pos, window = _case("prefill_window", np.random.default_rng(11))
    bf = [jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)]
    want = attend_ref(*[np.asarray(a, np.float32) for a in bf], sinks, q_pos, k_pos, window, H**-0.5)
    got = flash_attend_pallas(*bf, sinks, q_pos, k_pos, window=window, scale=H**-0.5, block_q=16, block_k=8)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=3e-2)
