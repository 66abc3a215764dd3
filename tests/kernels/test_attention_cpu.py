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
    """A decode step: q, k, v before RoPE, the rows' RoPE tables, caches part-filled in a ring's order (some slots
    empty, some positions past the query), sinks and the query positions."""
    q = jnp.asarray(rng.normal(size=(B, 1, N, H)), q_dtype)
    k = jnp.asarray(rng.normal(size=(B, 1, K, H)) * 2, q_dtype)
    v = jnp.asarray(rng.normal(size=(B, 1, K, H)), q_dtype)
    angle = rng.uniform(0, 7, (B, 1, H // 2))
    cos, sin = jnp.asarray(np.cos(angle) * 1.3, jnp.float32), jnp.asarray(np.sin(angle) * 1.3, jnp.float32)
    k_cache = jnp.asarray(rng.normal(size=(B, S, K, H)) * 2, kv_dtype)
    v_cache = jnp.asarray(rng.normal(size=(B, S, K, H)), kv_dtype)
    k_pos = rng.permutation(S + 6)[:S][None].repeat(B, 0).astype(np.int32)
    k_pos[rng.random((B, S)) < 0.2] = -1  # empty slots
    sinks = jnp.asarray(rng.normal(size=(N,)) * 2, jnp.float32)
    q_pos = rng.integers(0, S + 6, (B, 1)).astype(np.int32)
    return q, k, v, cos, sin, k_cache, v_cache, jnp.asarray(k_pos), sinks, jnp.asarray(q_pos)


def step_ref(q, k, v, cos, sin, k_cache, v_cache, k_pos, sinks, q_pos, window, scale, ring):
    """numpy: RoPE in float64 rounded to the input's dtype, the write at slot q_pos (ring: q_pos % S; dropped when
    negative or past a linear cache), then attend_ref over the updated cache."""
    c, s = np.asarray(cos, np.float64)[:, :, None], np.asarray(sin, np.float64)[:, :, None]

    def rope(x):
        x1, x2 = np.split(np.asarray(x, np.float64), 2, axis=-1)
        return np.asarray(jnp.asarray(np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1), jnp.float32), x.dtype)

    qr, kr = rope(q), rope(k)
    kc, vc, kp = np.array(k_cache), np.array(v_cache), np.array(k_pos)
    S = kc.shape[1]
    for b, p in enumerate(np.asarray(q_pos)[:, 0]):
        if p >= 0 and (ring or p < S):
            kc[b, p % S], vc[b, p % S], kp[b, p % S] = np.asarray(kr[b, 0], kc.dtype), np.asarray(v[b, 0], vc.dtype), p
    return attend_ref(qr, kc, vc, sinks, q_pos, kp, window, scale), kc, vc, kp


def run_step(*args, window, scale, ring):
    return jax.jit(lambda *a: attention_cpu.decode_attention(*a, window=window, scale=scale, ring=ring))(*args)


def check(got, want, dtype):
    """Output to fp32 sums; caches to the last bit of their dtype (RoPE in fp32 vs float64 may round differently)."""
    o, kc, vc, kp = got
    np.testing.assert_allclose(np.asarray(o, np.float64), want[0], rtol=1e-5, atol=1e-5 * np.abs(want[0]).max())
    ulp = 2.0**-7 if dtype == jnp.bfloat16 else 2.0**-21  # of the value, or of the RoPE terms when they cancel
    key = np.asarray(want[1], np.float64)
    np.testing.assert_allclose(np.asarray(kc, np.float64), key, rtol=ulp, atol=ulp * np.abs(key).max())
    np.testing.assert_array_equal(np.asarray(vc), want[2])
    np.testing.assert_array_equal(np.asarray(kp), want[3])


CASES = [  # (B, N, K, H, S, window, ring): all dims distinct; H % 8 != 0 takes the portable task on either setting
    (2, 12, 4, 24, 37, 5, True),
    (1, 64, 8, 64, 130, None, False),
    (3, 14, 2, 20, 9, 3, True),
    (2, 6, 6, 128, 17, None, False),
    (1, 10, 5, 72, 1, 4, True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}N{}K{}H{}S{}W{}R{:d}".format(*c))
@pytest.mark.parametrize("q_dtype, kv_dtype", [(jnp.float32, jnp.float32), (jnp.bfloat16, jnp.bfloat16),
                                               (jnp.float32, jnp.bfloat16)])
def test_matches_the_float64_oracle(task, case, q_dtype, kv_dtype):
    B, N, K, H, S, window, ring = case
    rng = np.random.default_rng(sum(case[:5]))
    args = problem(rng, B, N, K, H, S, q_dtype, kv_dtype)
    got = run_step(*args, window=window, scale=0.3, ring=ring)
    assert got[0].dtype == jnp.float32 and got[0].shape == args[0].shape
    assert [(a.shape, a.dtype) for a in got[1:]] == [(a.shape, a.dtype) for a in args[5:8]]
    check(got, step_ref(*args, window, 0.3, ring), kv_dtype)


@pytest.mark.parametrize("ring", [False, True])
def test_the_write_goes_to_its_slot_or_nowhere(task, ring):
    """Row 0 at a position past a linear cache (a ring: slot p % S), row 1 at a negative position (padding: no write,
    no allowed key, output 0), row 2 into an empty slot."""
    rng = np.random.default_rng(9)
    args = list(problem(rng, 3, 8, 4, 16, 6, jnp.float32, jnp.float32))
    args[9] = jnp.array([[8], [-1], [1]], jnp.int32)
    args[7] = args[7].at[2, 1].set(-1)
    got = run_step(*args, window=None, scale=0.5, ring=ring)
    want = step_ref(*args, None, 0.5, ring)
    check(got, want, jnp.float32)
    assert (np.asarray(got[3])[0] == 8).any() == ring and (np.asarray(got[3])[1] == np.asarray(args[7])[1]).all()
    assert np.asarray(got[3])[2, 1] == 1
    assert (np.asarray(got[0])[1] == 0).all() and (np.asarray(got[0])[2] != 0).any()


def test_a_row_with_no_allowed_slot_is_zero(task):
    """Every key in the future or empty, and the new one not written (past a linear cache): the sinks take all the
    weight, the output is 0 (as in attend)."""
    rng = np.random.default_rng(3)
    args = list(problem(rng, 2, 8, 4, 16, 6, jnp.float32, jnp.float32))
    args[9] = jnp.array([[6], [5]], jnp.int32)
    args[7] = jnp.array([[7, 8, -1, 7, 9, -1], [0, 1, 2, 3, 4, 5]], jnp.int32)
    got = run_step(*args, window=None, scale=0.5, ring=False)
    assert (np.asarray(got[0])[0] == 0).all() and (np.asarray(got[0])[1] != 0).any()
    check(got, step_ref(*args, None, 0.5, False), jnp.float32)


def test_shape_errors_name_the_tensors():
    rng = np.random.default_rng(4)
    args = list(problem(rng, 1, 8, 4, 16, 6, jnp.float32, jnp.float32))
    bad = args[:7] + [args[7][:, :5]] + args[8:]
    with pytest.raises(Exception, match=r"decode attention: shapes do not match .*k_pos \[1, 5\]"):
        attention_cpu.decode_attention(*bad, window=None, scale=1.0, ring=False)
    bad = [args[0][:, :, :6]] + args[1:8] + [args[8][:6]] + args[9:]
    bad[1:3] = [a[:, :, :4] for a in args[1:3]]
    bad[5:7] = [a[:, :, :4] for a in args[5:7]]
    with pytest.raises(Exception, match="multiple of kv heads"):
        attention_cpu.decode_attention(*bad, window=None, scale=1.0, ring=False)


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
    for name in ("k_BSKH", "v_BSKH", "pos_BS"):
        np.testing.assert_array_equal(np.asarray(getattr(cache_on, name)), np.asarray(getattr(cache_off, name)))
