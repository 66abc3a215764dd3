import jax.numpy as jnp
import pytest

from gptoss import random_model as _random_model


@pytest.fixture(scope="session")
def random_model():
    """Factory: random_model(cfg, dtype=jnp.float32, experts="mxfp4", seed=0) -> GptOss (every parameter random)."""

    def make(cfg, dtype=jnp.float32, experts="mxfp4", seed=0):
        return _random_model(cfg, dtype=dtype, experts=experts, seed=seed)

    return make
