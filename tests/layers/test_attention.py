"""attend() and the Attention module against a naive per-query loop and transformers' eager attention."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gptoss.config import ModelConfig
from gptoss.layers.attention import Attention, attend
from gptoss.layers.rope import inv_freq_and_concentration, rope_tables

B, T, N, K, H = 2, 11, 6, 2, 20  # all distinct; GQA group G = 3


def naive_attend(q, k, v, sinks, q_pos, k_pos, window, scale):
    """Facts §4.3, one query and one head at a time in float64.

    Allowed keys: 0 <= j_pos <= i_pos and, with a window W, j_pos >= i_pos - (W - 1) (W keys including
    the current one). The head's sink is one extra logit (not scaled) with no value. Head n reads kv head
    n // (N / K).
    """
    q, k, v, sinks = (np.asarray(a, np.float64) for a in (q, k, v, sinks))
    b_, t_, n_, h_ = q.shape
    s_, k_ = k.shape[1], k.shape[2]
    out = np.zeros((b_, t_, n_, h_))
    for b in range(b_):
        for t in range(t_):
            for n in range(n_):
                kv = n // (n_ // k_)
                logits, values = [], []
                for s in range(s_):
                    kp, qp = int(k_pos[b, s]), int(q_pos[b, t])
                    if kp < 0 or kp > qp or (window is not None and kp < qp - window + 1):
                        continue
                    logits.append(float(q[b, t, n] @ k[b, s, kv]) * scale)
                    values.append(v[b, s, kv])
                m = max(logits + [sinks[n]])
                weights = [np.exp(x - m) for x in logits]
                denom = sum(weights) + np.exp(sinks[n] - m)
                for w, val in zip(weights, values):
                    out[b, t, n] += w / denom * val
    return out


def random_qkv(seed, b=B, t=T, s=T, n=N, k=K, h=H, sink_scale=1.0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(b, t, n, h)).astype(np.float32)
    kk = rng.normal(size=(b, s, k, h)).astype(np.float32)
    v = rng.normal(size=(b, s, k, h)).astype(np.float32)
    sinks = (rng.normal(size=(n,)) * sink_scale).astype(np.float32)
    return q, kk, v, sinks


_attend = jax.jit(attend, static_argnames=("window", "scale"))


def check(q, k, v, sinks, q_pos, k_pos, window, scale=H**-0.5):
    got = _attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(sinks), jnp.asarray(q_pos),
             jnp.asarray(k_pos), window=window, scale=scale)
    assert got.shape == q.shape
    want = naive_attend(q, k, v, sinks, q_pos, k_pos, window, scale)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-5)
    return np.asarray(got)


@pytest.mark.parametrize("window", [None, 4, 1])
def test_attend_prefill_matches_naive(window):
    q, k, v, sinks = random_qkv(0, sink_scale=3.0)
    pos = np.broadcast_to(np.arange(T), (B, T))
    check(q, k, v, sinks, pos, pos, window)


def test_window_changes_the_result():
    # the oracle and attend must both see the window: T > W, so the window matters for late queries
    q, k, v, sinks = random_qkv(1)
    pos = np.broadcast_to(np.arange(T), (B, T))
    full = check(q, k, v, sinks, pos, pos, None)
    win = check(q, k, v, sinks, pos, pos, 4)
    np.testing.assert_allclose(full[:, :4], win[:, :4], rtol=1e-6, atol=1e-7)  # first 4 queries: same keys
    assert not np.allclose(full[:, 4:], win[:, 4:], atol=1e-3)


def test_decode_with_cache_slots_and_padding():
    # 3 new queries at absolute positions 20..22 (batch 0) and 5..7 (batch 1) against a 16-slot cache whose
    # slots hold arbitrary positions (a ring buffer) and -1 for empty slots; batch 1 is left-padded.
    q, k, v, sinks = random_qkv(2, t=3, s=16)
    q_pos = np.array([[20, 21, 22], [5, 6, 7]])
    k_pos = np.array([[16, 17, 18, 19, 20, 21, 22, -1, 8, 9, 10, 11, 12, 13, 14, 15],
                      [-1, -1, -1, -1, 0, 1, 2, 3, 4, 5, 6, 7, -1, -1, -1, -1]])
    for window in (None, 4, 7):
        check(q, k, v, sinks, q_pos, k_pos, window)


def test_negative_key_positions_are_masked():
    q, k, v, sinks = random_qkv(3)
    pos = np.broadcast_to(np.arange(T), (B, T)).copy()
    k_pos = pos.copy()
    k_pos[:, 2] = -1
    got = check(q, k, v, sinks, pos, k_pos, None)
    # changing the masked key/value must not change anything
    k2, v2 = k.copy(), v.copy()
    k2[:, 2] += 100.0
    v2[:, 2] = 1e6
    got2 = _attend(jnp.asarray(q), jnp.asarray(k2), jnp.asarray(v2), jnp.asarray(sinks), jnp.asarray(pos),
                  jnp.asarray(k_pos), window=None, scale=H**-0.5)
    np.testing.assert_allclose(np.asarray(got2), got, rtol=1e-6, atol=1e-6)


def test_query_with_no_allowed_key_returns_zero():
    # only the sink is left: weights are all 0 and the output is exactly 0 (no NaN)
    q, k, v, sinks = random_qkv(4, t=2, s=3)
    got = check(q, k, v, sinks, np.array([[0, 1]] * B), np.array([[-1, 5, 6]] * B), None)
    assert np.all(got == 0)


def test_sink_is_an_unscaled_logit_and_weights_sum_below_one():
    # v = 1 everywhere: the output is the total attention weight, sum_j p_j = Z / (Z + exp(S)).
    q, k, _, _ = random_qkv(5)
    v = np.ones((B, T, K, H), np.float32)
    pos = np.broadcast_to(np.arange(T), (B, T))
    scale = 0.37
    for sinks in (np.full(N, -30.0, np.float32), np.linspace(-2, 4, N).astype(np.float32)):
        got = check(q, k, v, sinks, pos, pos, None, scale=scale)
        qf, kf = q.astype(np.float64), k.astype(np.float64)
        for n in range(N):
            s = np.einsum("bth,bsh->bts", qf[:, :, n], kf[:, :, n // 3]) * scale
            s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
            z = np.exp(s).sum(-1)
            np.testing.assert_allclose(got[:, :, n, 0], z / (z + np.exp(sinks[n])), rtol=1e-5)
    assert got.max() < 1.0


def test_gqa_head_mapping():
    # make kv head 1 different from kv head 0: heads 0..2 must read kv head 0, heads 3..5 kv head 1
    q, k, v, sinks = random_qkv(6)
    v[:, :, 0] = 0.0
    pos = np.broadcast_to(np.arange(T), (B, T))
    got = check(q, k, v, sinks, pos, pos, None)
    assert np.all(got[:, :, :3] == 0) and np.all(np.abs(got[:, :, 3:]).max(axis=-1) > 0)


@pytest.mark.parametrize("window", [None, 4])
def test_attend_matches_transformers_eager(window):
    torch = pytest.importorskip("torch")
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    q, k, v, sinks = random_qkv(7, sink_scale=2.0)
    pos = np.broadcast_to(np.arange(T), (B, T))
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    allowed = j <= i
    if window is not None:
        allowed &= j > i - window  # transformers' sliding_window_overlay: kv > q - window
    mask = torch.from_numpy(np.where(allowed, 0.0, -np.inf).astype(np.float32))[None, None].expand(B, 1, T, T)
    module = types.SimpleNamespace(num_key_value_groups=N // K, sinks=torch.from_numpy(sinks), training=False)
    t = lambda a: torch.from_numpy(a).transpose(1, 2)  # noqa: E731  [B, T, heads, H] -> [B, heads, T, H]
    want, _ = eager_attention_forward(module, t(q), t(k), t(v), mask, scaling=H**-0.5)
    got = _attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(sinks), jnp.asarray(pos),
                  jnp.asarray(pos), window=window, scale=H**-0.5)
    np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=1e-5, atol=1e-5)


def test_attend_bf16_inputs_compute_in_fp32():
    q, k, v, sinks = random_qkv(8)
    pos = np.broadcast_to(np.arange(T), (B, T))
    args = [jnp.asarray(a, jnp.bfloat16) for a in (q, k, v, sinks)]
    got = _attend(*args, jnp.asarray(pos), jnp.asarray(pos), window=4, scale=H**-0.5)
    assert got.dtype == jnp.float32  # the caller casts; the softmax and value sum are fp32
    want = naive_attend(*(np.asarray(a, np.float32) for a in args), pos, pos, 4, H**-0.5)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ Attention module
def numpy_rope(x, positions, cfg):
    """Facts §4.4 half-split rotation in float64, using the inverse frequencies under test elsewhere."""
    inv_freq, conc = inv_freq_and_concentration(cfg)
    ang = positions[..., None].astype(np.float64) * inv_freq.astype(np.float64)
    cos, sin = (np.cos(ang) * conc)[:, :, None], (np.sin(ang) * conc)[:, :, None]
    x1, x2 = np.split(x, 2, axis=-1)
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


@pytest.mark.parametrize("layer", [0, 1])  # tiny: layer 0 slides (window 5), layer 1 is full
def test_attention_module_matches_numpy(layer):
    cfg = ModelConfig.tiny()
    attn = Attention(cfg, layer, dtype=jnp.float32, rngs=nnx.Rngs(0))
    assert attn.window == (cfg.sliding_window if layer == 0 else None)
    rng = np.random.default_rng(9)
    for p in (attn.bq_NH, attn.bk_KH, attn.bv_KH, attn.bo_D, attn.sinks_N):  # make the zero-init params matter
        p[...] = jnp.asarray(rng.normal(size=p[...].shape), jnp.float32)
    x = rng.normal(size=(2, 9, cfg.hidden_size)).astype(np.float32)
    positions = np.array([np.arange(9), np.arange(9) + 30])
    cos, sin = rope_tables(cfg, jnp.asarray(positions))
    got, cache = nnx.jit(lambda m, x, p, c, s: m(x, p, c, s))(attn, jnp.asarray(x), jnp.asarray(positions),
                                                              cos, sin)
    assert cache is None  # no cache given: plain prefill

    w = {name: np.asarray(getattr(attn, name)[...], np.float64) for name in
         ("wq_NHD", "bq_NH", "wk_KHD", "bk_KH", "wv_KHD", "bv_KH", "wo_DNH", "bo_D", "sinks_N")}
    q = numpy_rope(np.einsum("btd,nhd->btnh", x, w["wq_NHD"]) + w["bq_NH"], positions, cfg)
    k = numpy_rope(np.einsum("btd,khd->btkh", x, w["wk_KHD"]) + w["bk_KH"], positions, cfg)
    v = np.einsum("btd,khd->btkh", x, w["wv_KHD"]) + w["bv_KH"]
    o = naive_attend(q, k, v, w["sinks_N"], positions, positions, attn.window, cfg.head_dim**-0.5)
    want = np.einsum("btnh,dnh->btd", o, w["wo_DNH"]) + w["bo_D"]
    assert got.shape == x.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------ attend_blocked (prefill by blocks)
def _long_qkv(seed, T_, S_=None):
    rng = np.random.default_rng(seed)
    S_ = T_ if S_ is None else S_
    q = jnp.asarray(rng.normal(size=(B, T_, N, H)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(B, S_, K, H)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(B, S_, K, H)), jnp.float32)
    sinks = jnp.asarray(rng.normal(size=(N,)), jnp.float32)
    return q, k, v, sinks


@pytest.mark.parametrize("window", [None, 5, 200])
def test_attend_blocked_equals_attend_in_order(window):
    """Several query blocks (T = 300 > 2 blocks of 128), right padding on one row: same as the whole matrix."""
    from gptoss.layers.attention import attend_blocked, query_block

    T_ = 300
    assert T_ > 2 * query_block(T_)
    q, k, v, sinks = _long_qkv(7, T_)
    pos = np.broadcast_to(np.arange(T_, dtype=np.int32), (B, T_)).copy()
    pos[1, 250:] = -1  # row 1 is a 250-token prompt, right-padded
    pos = jnp.asarray(pos)
    want = attend(q, k, v, sinks, pos, pos, window=window, scale=H**-0.5)
    got = attend_blocked(q, k, v, sinks, pos, pos, window=window, scale=H**-0.5)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    spot = naive_attend(q[:1, 280:282], k[:1], v[:1], sinks, pos[:1, 280:282], pos[:1], window, H**-0.5)
    np.testing.assert_allclose(np.asarray(got[:1, 280:282]), spot, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("window", [None, 5])
def test_attend_blocked_with_a_cache_prefix(window):
    """Keys = 40 cache slots (shuffled earlier positions, some empty) + the chunk's own 300 keys."""
    from gptoss.layers.attention import attend_blocked

    T_, P = 300, 40
    q, k, v, sinks = _long_qkv(8, T_, P + T_)
    rng = np.random.default_rng(9)
    cache_pos = np.stack([rng.permutation(np.r_[np.arange(P - 6), -np.ones(6, np.int64)]) for _ in range(B)])
    chunk_pos = np.broadcast_to(np.arange(P, P + T_), (B, T_))  # the chunk continues after the cached tokens
    k_pos = jnp.asarray(np.concatenate([cache_pos, chunk_pos], axis=1), jnp.int32)
    q_pos = jnp.asarray(chunk_pos, jnp.int32)
    want = attend(q, k, v, sinks, q_pos, k_pos, window=window, scale=H**-0.5)
    got = attend_blocked(q, k, v, sinks, q_pos, k_pos, window=window, scale=H**-0.5, n_prefix=P)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_model_forward_blocked_equals_explicit_positions():
    """forward() without positions attends block by block; with explicit positions it takes the whole matrix."""
    from gptoss.model import GptOss

    cfg = ModelConfig.tiny()
    model = GptOss(cfg, dtype=jnp.float32, experts="dense", rngs=nnx.Rngs(1))
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, cfg.vocab_size, (1, 270)), jnp.int32)
    blocked = model(tokens)
    whole = model(tokens, jnp.arange(270, dtype=jnp.int32)[None])
    np.testing.assert_allclose(np.asarray(blocked), np.asarray(whole), rtol=1e-5, atol=1e-5)
