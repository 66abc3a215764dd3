"""attend_flash (the XLA scan over query blocks with an online softmax over key blocks) against the float64 numpy
oracle and attend(); its gradient; its compiled temporaries are about one block's, not the score matrix."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_ref import attend_ref

from gptoss.layers.attention import FLASH_FROM, attend, attend_blocked
from gptoss.layers.flash import attend_flash

HI = jax.lax.Precision.HIGHEST
B, N, K, H = 2, 6, 2, 8


def _qkv(rng, T, S):
    return (rng.normal(size=(B, T, N, H)).astype(np.float32), rng.normal(size=(B, S, K, H)).astype(np.float32),
            rng.normal(size=(B, S, K, H)).astype(np.float32), rng.normal(size=N).astype(np.float32) * 2)


@pytest.mark.parametrize("window", [None, 3])
def test_flash_matches_numpy(window):
    """Prefill of 29 tokens (padded row, left-padded row) in blocks of 4 queries and 8 keys: ragged tails."""
    rng = np.random.default_rng(window or 0)
    T = 29
    q, k, v, sinks = _qkv(rng, T, T)
    pos = np.tile(np.arange(T), (B, 1))
    pos[0, 25:] = -1
    pos[1] = np.r_[-np.ones(4, int), np.arange(T - 4)]
    got = attend_flash(q, k, v, sinks, pos, pos, window=window, scale=H**-0.5, precision=HI, block_q=4, block_k=8)
    np.testing.assert_allclose(np.asarray(got), attend_ref(q, k, v, sinks, pos, pos, window, H**-0.5),
                               rtol=1e-5, atol=1e-5)


def test_flash_with_unordered_cache_keys():
    rng = np.random.default_rng(3)
    P, T = 10, 7
    q, k, v, sinks = _qkv(rng, T, P + T)
    cache = np.stack([rng.permutation(np.r_[np.arange(P - 2), -1, -1]) for _ in range(B)])
    q_pos = np.tile(np.arange(P - 2, P - 2 + T), (B, 1))
    k_pos = np.concatenate([cache, q_pos], axis=1)
    got = attend_flash(q, k, v, sinks, q_pos, k_pos, window=5, scale=H**-0.5, precision=HI, block_q=2, block_k=4)
    np.testing.assert_allclose(np.asarray(got), attend_ref(q, k, v, sinks, q_pos, k_pos, 5, H**-0.5),
                               rtol=1e-5, atol=1e-5)


def test_flash_gradient_equals_attend():
    rng = np.random.default_rng(5)
    T = 13
    q, k, v, sinks = _qkv(rng, T, T)
    pos = np.tile(np.arange(T), (B, 1))

    def loss(fn, q, k, v, s):
        return jnp.sum(fn(q, k, v, s, pos, pos, window=4, scale=H**-0.5, precision=HI) ** 2)

    flash = lambda *a, **kw: attend_flash(*a, **kw, block_q=4, block_k=8)  # noqa: E731
    g_ref = jax.grad(lambda *a: loss(attend, *a), argnums=(0, 1, 2, 3))(q, k, v, sinks)
    g = jax.grad(lambda *a: loss(flash, *a), argnums=(0, 1, 2, 3))(q, k, v, sinks)
    for a, b, name in zip(g, g_ref, "qkvs"):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5, err_msg=name)


def test_long_prompts_go_to_flash_and_keep_temporaries_to_a_block():
    """Past FLASH_FROM tokens attend_blocked is the scan: XLA's temporaries are a few blocks of scores, not the
    [T, T] matrix (2,048 tokens, 8 heads: the matrix would be 128 MiB in fp32)."""
    T, n, kh, h = 2 * FLASH_FROM, 8, 2, 16
    assert T > FLASH_FROM
    q = jax.ShapeDtypeStruct((1, T, n, h), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, T, kh, h), jnp.float32)
    pos = jax.ShapeDtypeStruct((1, T), jnp.int32)
    sinks = jax.ShapeDtypeStruct((n,), jnp.float32)

    def temp_bytes(fn):
        compiled = jax.jit(lambda *a: fn(*a, window=None, scale=0.25)).lower(q, kv, kv, sinks, pos, pos).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    whole = temp_bytes(attend)
    flash = temp_bytes(attend_blocked)
    matrix = n * T * T * 4
    block_scores = n * 256 * 512 * 4  # attend_flash's default blocks: 256 queries x 512 keys, all heads
    assert whole >= matrix
    assert flash <= 4 * block_scores + 8 * (T * n * h * 4), (flash, block_scores)
    assert flash * 8 < matrix


def test_a_chunk_against_a_long_cache_goes_to_flash():
    """A 40-token chunk after a 30,000-slot cache (mostly empty: the engine's prefill) is past uses_flash's bound;
    same result as the oracle, and the unrolled path is still taken for short chunks and caches."""
    from gptoss.layers.attention import uses_flash

    rng = np.random.default_rng(8)
    P, T = 30000, 40
    assert uses_flash(T, P + T) and not uses_flash(T, 3 * T) and not uses_flash(1, P)
    q, k, v, sinks = _qkv(rng, T, P + T)
    cache = -np.ones((B, P), int)
    cache[:, :25] = np.arange(25)  # 25 tokens cached, the rest empty
    q_pos = np.tile(np.arange(25, 25 + T), (B, 1))
    k_pos = np.concatenate([cache, q_pos], axis=1)
    got = attend_blocked(q, k, v, sinks, q_pos, k_pos, window=None, scale=H**-0.5, n_prefix=P, precision=HI)
    np.testing.assert_allclose(np.asarray(got), attend_ref(q, k, v, sinks, q_pos, k_pos, None, H**-0.5),
                               rtol=1e-5, atol=1e-5)
