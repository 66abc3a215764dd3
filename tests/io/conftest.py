import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gptoss import GptOss, MXFP4Array


def _random_model(cfg, dtype=jnp.float32, experts="mxfp4", seed=0):
    """A GptOss whose every parameter is random (biases, norms and sinks too, so a dropped or swapped tensor
    shows), built without running the initializers (eval_shape, then filled from numpy)."""
    abstract = nnx.eval_shape(lambda: GptOss(cfg, dtype=dtype, experts=experts))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(seed)
    for _, var in nnx.to_flat_state(state):
        v = var.get_value()
        if isinstance(v, MXFP4Array):
            blocks = rng.integers(0, 256, v.blocks.shape, dtype=np.uint8)
            scales = rng.integers(118, 130, v.scales.shape, dtype=np.uint8)
            var.set_value(MXFP4Array(jnp.asarray(blocks), jnp.asarray(scales), v.dtype))
        else:
            var.set_value(jnp.asarray(rng.standard_normal(v.shape).astype(v.dtype)))
    return nnx.merge(graphdef, state)


@pytest.fixture(scope="session")
def random_model():
    """Factory: random_model(cfg, dtype=jnp.float32, experts="mxfp4", seed=0) -> GptOss."""
    return _random_model
