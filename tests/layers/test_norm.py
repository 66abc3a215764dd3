"""RMSNorm against the numpy formula (facts §4.2) and transformers' GptOssRMSNorm."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gptoss.layers.norm import RMSNorm

D = 24


def numpy_rmsnorm(x, g, eps):
    x = np.asarray(x, np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * np.asarray(g, np.float64)


def make_norm(seed, eps=1e-5):
    norm = RMSNorm(D, eps=eps)
    g = np.random.default_rng(seed).normal(size=D).astype(np.float32)
    norm.scale_D[...] = jnp.asarray(g)
    return norm, g


_call = nnx.jit(lambda m, x: m(x))


@pytest.mark.parametrize("eps", [1e-5, 1e-2])
def test_rmsnorm_matches_numpy(eps):
    norm, g = make_norm(0, eps)
    x = (np.random.default_rng(1).normal(size=(2, 3, D)) * 0.01).astype(np.float32)  # small: eps matters
    got = _call(norm, jnp.asarray(x))
    assert got.dtype == jnp.float32 and got.shape == x.shape
    np.testing.assert_allclose(np.asarray(got), numpy_rmsnorm(x, g, eps), rtol=1e-5, atol=1e-6)


def test_rmsnorm_default_gain_is_one_and_eps_is_used():
    norm = RMSNorm(D)
    assert norm.scale_D[...].dtype == jnp.float32 and np.all(np.asarray(norm.scale_D[...]) == 1)
    x = np.zeros((1, D), np.float32)
    x[0, 0] = 1e-3
    got = np.asarray(norm(jnp.asarray(x)))
    np.testing.assert_allclose(got, numpy_rmsnorm(x, np.ones(D), 1e-5), rtol=1e-5)
    assert got[0, 0] < 0.5  # without eps it would be sqrt(D) ~ 4.9


def test_rmsnorm_bf16_in_bf16_out_computed_in_fp32():
    norm, g = make_norm(2)
    x = jnp.asarray(np.random.default_rng(3).normal(size=(4, D)) * 50, jnp.bfloat16)
    got = _call(norm, x)
    assert got.dtype == jnp.bfloat16
    want = numpy_rmsnorm(np.asarray(x, np.float32), g, 1e-5).astype(jnp.bfloat16)  # fp32 math, one final rounding
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_rmsnorm_matches_transformers(dtype):
    torch = pytest.importorskip("torch")
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRMSNorm

    norm, g = make_norm(4)
    hf = GptOssRMSNorm(D, eps=1e-5)  # transformers keeps the gain in fp32 (_keep_in_fp32_modules)
    with torch.no_grad():
        hf.weight.copy_(torch.from_numpy(g))
    x32 = np.random.default_rng(5).normal(size=(2, 5, D)).astype(np.float32) * 3
    x_jax = jnp.asarray(x32, dtype)
    x_torch = torch.from_numpy(np.array(x_jax, np.float32)).to(getattr(torch, dtype))
    with torch.no_grad():
        want = hf(x_torch)
    got = _call(norm, x_jax)
    assert str(want.dtype).endswith(dtype) and got.dtype == jnp.dtype(dtype)
    if dtype == "float32":
        np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=1e-6, atol=1e-6)
    else:  # both compute in fp32 and round once; allow a one-ulp difference from rsqrt
        np.testing.assert_allclose(np.asarray(got, np.float32), want.float().numpy(), rtol=2**-7, atol=1e-6)
