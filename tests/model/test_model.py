"""Model-level behaviour that the parity tests do not cover: input checks, jit caching, invariances."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gptoss import GptOss, ModelConfig


@pytest.fixture(scope="module")
def model():
    return GptOss(ModelConfig.tiny(), dtype=jnp.float32, experts="mxfp4", rngs=nnx.Rngs(3))


def test_output_shapes_and_dtypes(model):
    tokens = np.arange(14, dtype=np.int32).reshape(2, 7)
    logits, router = model(tokens, return_router_logits=True)
    assert logits.shape == (2, 7, 331) and logits.dtype == jnp.float32
    assert router.shape == (3, 2, 7, 5)


def test_bad_tokens_are_named(model):
    with pytest.raises(ValueError, match="331"):
        model(np.array([[1, 2, 331]]))
    with pytest.raises(ValueError, match=r"-1 at \[0, 1\]"):
        model(np.array([[1, -1]]))
    with pytest.raises(ValueError, match="1-D"):
        model(np.array([1, 2, 3]))
    with pytest.raises(TypeError, match="integers"):
        model(np.array([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="moe_impl"):
        model(np.array([[1, 2]]), moe_impl="fast")


def test_rope_is_relative(model):
    """Shifting every position by a constant leaves attention (and so the logits) unchanged."""
    tokens = np.random.default_rng(0).integers(0, 331, (1, 12))
    base = np.asarray(model(tokens))
    shifted = np.asarray(model(tokens, positions_BT=np.arange(12)[None] + 37))
    np.testing.assert_allclose(shifted, base, rtol=2e-4, atol=2e-4)


def test_batch_rows_are_independent(model):
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 331, (1, 10)), rng.integers(0, 331, (1, 10))
    both = np.asarray(model(np.concatenate([a, b])))
    np.testing.assert_allclose(both[1], np.asarray(model(b))[0], rtol=1e-5, atol=1e-5)


def test_causal(model):
    """Changing a later token never changes earlier logits."""
    tokens = np.random.default_rng(2).integers(0, 331, (1, 11))
    changed = tokens.copy()
    changed[0, 8] = (changed[0, 8] + 1) % 331
    np.testing.assert_allclose(np.asarray(model(changed))[0, :8], np.asarray(model(tokens))[0, :8], atol=1e-6)


def test_traceable_forward_under_user_jit(model):
    graphdef, state = nnx.split(model)

    @jax.jit
    def f(state, tokens):
        return nnx.merge(graphdef, state)(tokens)

    tokens = jnp.ones((1, 4), jnp.int32)
    np.testing.assert_allclose(np.asarray(f(state, tokens)), np.asarray(model(tokens)), atol=1e-6)


def test_mxfp4_needs_whole_blocks():
    with pytest.raises(ValueError, match="multiple of 32"):
        GptOss(ModelConfig.tiny(hidden_size=100), experts="mxfp4")
    GptOss(ModelConfig.tiny(hidden_size=100), experts="dense", dtype=jnp.float32)
