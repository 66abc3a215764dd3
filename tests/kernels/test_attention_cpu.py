"""The decode attention kernel (csrc/attention_decode.cc) against the float64 numpy oracle, on both of its tasks
(AVX2 and portable), and its use by the model's decode step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gptoss.config import ModelConfig
from gptoss.kernels import attention_cpu
from gptoss.layers.attention import Attention
from gptoss.layers.kv_cache import LayerCache
from gptoss.layers.rope import rope_tables
from gptoss.layers.runtime import Runtime
from tests.attention_ref import attend_ref

pytestmark = pytest.mark.skipif(not attention_cpu.kernel_available() or jax.default_backend() != "cpu",
                                reason="no decode attention kernel")


@pytest.fixture(params=["avx2", "portable"])
def task(request):
    attention_cpu.set_portable(request.param == "portable")
    yield request.param
    attention_cpu.set_portable(False)


def problem(rng, B, N, K, H, S, q_dtype, kv_dtype):
    q = jnp.asarray(rng.normal(size=(B, 1, N, H)), q_dtype)
    k = jnp.asarray(rng.normal(size=(B, S, K, H)) * 2, kv_dtype)
    v = jnp.asarray(rng.normal(size=(B, S, K, H)), kv_dtype)
    sinks = jnp.asarray(rng.normal(size=(N,)) * 2, jnp.float32)
    q_pos = rng.integers(0, S + 6, (B, 1)).astype(np.int32)
    k_pos = rng.permutation(S + 6)[:S][None].repeat(B, 0).astype(np.int32)  # a ring's order; some > q_pos
    k_pos[rng.random((B, S)) < 0.2] = -1  # empty slots
    return q, k, v, sinks, jnp.asarray(q_pos), jnp.asarray(k_pos)


CASES = [  # (B, N, K, H, S, window): all dims distinct; H % 8 != 0 takes the portable task on either setting
    (2, 12, 4, 24, 37, 5),
    (1, 64, 8, 64, 130, None),
    (3, 14, 2, 20, 9, 3),
    (2, 6, 6, 128, 17, None),
    (1, 10, 5, 72, 1, 4),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}N{}K{}H{}S{}W{}".format(*c))
@pytest.mark.parametrize("q_dtype, kv_dtype", [(jnp.float32, jnp.float32), (jnp.bfloat16, jnp.bfloat16),
                                               (jnp.float32, jnp.bfloat16)])
def test_matches_the_float64_oracle(task, case, q_dtype, kv_dtype):
    B, N, K, H, S, window = case
    rng = np.random.default_rng(sum(case[:5]))
    q, k, v, sinks, q_pos, k_pos = problem(rng, B, N, K, H, S, q_dtype, kv_dtype)
    got = jax.jit(lambda *a: attention_cpu.decode_attention(*a, window=window, scale=0.3))(q, k, v, sinks, q_pos,
                                                                                            k_pos)
    want = attend_ref(q, k, v, sinks, q_pos, k_pos, window, 0.3)
    assert got.dtype == jnp.float32 and got.shape == q.shape
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_a_row_with_no_allowed_slot_is_zero(task):
    """Every key in the future or empty: the sinks take all the weight, the output is 0 (as in attend)."""
    rng = np.random.default_rng(3)
    q, k, v, sinks, _, _ = problem(rng, 2, 8, 4, 16, 6, jnp.float32, jnp.float32)
    q_pos = jnp.array([[2], [5]], jnp.int32)
    k_pos = jnp.array([[3, 4, -1, 7, 9, -1], [0, 1, 2, 3, 4, 5]], jnp.int32)
    got = np.asarray(attention_cpu.decode_attention(q, k, v, sinks, q_pos, k_pos, window=None, scale=0.5))
    assert (got[0] == 0).all() and (got[1] != 0).any()
    np.testing.assert_allclose(got, attend_ref(q, k, v, sinks, q_pos, k_pos, None, 0.5), rtol=1e-5, atol=1e-6)


def test_shape_errors_name_the_tensors():
    rng = np.random.default_rng(4)
    q, k, v, sinks, q_pos, k_pos = problem(rng, 1, 8, 4, 16, 6, jnp.float32, jnp.float32)
    with pytest.raises(Exception, match=r"decode attention: shapes do not match .*k_pos \[1, 5\]"):
        attention_cpu.decode_attention(q, k, v, sinks, q_pos, k_pos[:, :5], window=None, scale=1.0)
    with pytest.raises(Exception, match="multiple of kv heads"):
        attention_cpu.decode_attention(q[:, :, :6], k[:, :, :4], v[:, :, :4], sinks[:6], q_pos, k_pos, window=None,
                                       scale=1.0)


def test_serves_decode_only():
    q, k = jnp.zeros((1, 1, 8, 16), jnp.bfloat16), jnp.zeros((1, 32, 4, 16), jnp.bfloat16)
    assert attention_cpu.serves(q, k)
    assert not attention_cpu.serves(q, k, enabled=False)
    assert not attention_cpu.serves(jnp.zeros((1, 2, 8, 16), jnp.bfloat16), k)  # two queries: a chunk
    assert not attention_cpu.serves(jnp.zeros((1, 1, 6, 16), jnp.bfloat16), k)  # 6 heads over 4 kv heads
    assert not attention_cpu.serves(q.astype(jnp.float16), k)


@pytest.mark.parametrize("window", [None, 3])
def test_the_decode_step_uses_it_and_matches_xla(window):
    """A layer's decode step over a part-filled cache: kernels='cpu' runs the kernel (HLO), 'xla' does not; same
    output and cache."""
    cfg = ModelConfig.tiny()
    attn = Attention(cfg, 0, dtype=jnp.float32, rngs=nnx.Rngs(5))
    attn.window = window
    rng = np.random.default_rng(6)
    B, S = 2, 7
    x = jnp.asarray(rng.normal(size=(B, 1, cfg.hidden_size)), jnp.float32)
    pos = jnp.array([[4], [2]], jnp.int32)
    cache = LayerCache.empty(B, S, cfg.num_key_value_heads, cfg.head_dim, jnp.float32, ring=False)
    cache = cache.write(jnp.asarray(rng.normal(size=(B, 4, cfg.num_key_value_heads, cfg.head_dim)), jnp.float32),
                        jnp.asarray(rng.normal(size=(B, 4, cfg.num_key_value_heads, cfg.head_dim)), jnp.float32),
                        jnp.array([[0, 1, 2, 3], [0, 1, -1, -1]], jnp.int32))
    cos, sin = rope_tables(cfg, pos)

    def run(kernels):
        graphdef, state = nnx.split(attn)
        rt = Runtime(kernels=kernels, dtype=jnp.float32)
        fn = jax.jit(lambda state, x, cache: nnx.merge(graphdef, state)(x, pos, cos, sin, cache, rt=rt))
        return fn.lower(state, x, cache).as_text(), fn(state, x, cache)

    hlo_on, (on, cache_on) = run("cpu")
    hlo_off, (off, cache_off) = run("xla")
    assert attention_cpu.TARGET in hlo_on and attention_cpu.TARGET not in hlo_off
    np.testing.assert_allclose(np.asarray(on), np.asarray(off), rtol=1e-5, atol=1e-5 * float(jnp.abs(off).max()))
    np.testing.assert_array_equal(np.asarray(cache_on.k_BSKH), np.asarray(cache_off.k_BSKH))
