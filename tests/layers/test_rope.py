"""YaRN RoPE against transformers (ROPE_INIT_FUNCTIONS, GptOssRotaryEmbedding, _apply_rotary_emb) and the facts."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptoss.config import ModelConfig
from gptoss.layers.rope import apply_rope, inv_freq_and_concentration, rope_tables

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.gpt_oss import modeling_gpt_oss as hf  # noqa: E402

# hub-style config of gpt-oss-20b, written independently of ModelConfig.to_hf
HF_20B_ROPE = dict(
    num_hidden_layers=24, num_local_experts=32, head_dim=64, hidden_size=2880, num_attention_heads=64,
    num_key_value_heads=8, max_position_embeddings=131072,
    rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0,
                     "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 4096},
)


def facts_yarn(d, base, f, L0, alpha, beta):
    """§4.4 of the facts, in float64: ramp between low/high (not rounded), concentration 0.1 ln f + 1."""
    i = np.arange(d // 2, dtype=np.float64)
    freq = base ** (2 * i / d)
    low = (d / 2) * math.log(L0 / (beta * 2 * math.pi)) / math.log(base)
    high = (d / 2) * math.log(L0 / (alpha * 2 * math.pi)) / math.log(base)
    mask = 1 - np.clip((i - low) / (high - low), 0, 1)
    return (1 / (f * freq)) * (1 - mask) + (1 / freq) * mask, 0.1 * math.log(f) + 1


@pytest.mark.parametrize("name", ["20b", "tiny"])
def test_inv_freq_matches_transformers_yarn(name):
    if name == "20b":
        cfg, hf_cfg = ModelConfig.gpt_oss_20b(), transformers.GptOssConfig(**HF_20B_ROPE)
    else:
        cfg = ModelConfig.tiny()
        hf_cfg = transformers.GptOssConfig(**cfg.to_hf())
    want, want_conc = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg)
    got, conc = inv_freq_and_concentration(cfg)
    assert got.shape == (cfg.head_dim // 2,) and got.dtype == np.float32
    np.testing.assert_allclose(got, want.numpy(), rtol=2e-6)
    assert conc == pytest.approx(want_conc, rel=1e-12)


def test_inv_freq_matches_facts_formula_20b():
    # (the reference formula does not clamp low >= 0 as transformers does; for gpt-oss low = 8.09 > 0 anyway)
    cfg = ModelConfig.gpt_oss_20b()
    got, conc = inv_freq_and_concentration(cfg)
    want, want_conc = facts_yarn(64, 150000.0, 32.0, 4096, 1.0, 32.0)
    np.testing.assert_allclose(got, want, rtol=2e-6)
    assert conc == pytest.approx(want_conc, rel=1e-12)


def test_inv_freq_derived_values_20b():
    inv_freq, conc = inv_freq_and_concentration(ModelConfig.gpt_oss_20b())
    np.testing.assert_allclose(inv_freq[:4], [1.0, 0.68904, 0.47478, 0.32715], rtol=2e-5)
    np.testing.assert_allclose(inv_freq[31], 3.0235e-7, rtol=1e-4)
    assert conc == pytest.approx(1.346574, abs=1e-6)
    base = 150000.0 ** (-np.arange(32) / 32)
    np.testing.assert_allclose(inv_freq[:9], base[:9], rtol=1e-6)  # dims <= 8 keep their frequency
    np.testing.assert_allclose(inv_freq[18:], base[18:] / 32, rtol=1e-6)  # dims >= 18 are divided by 32
    assert np.all((inv_freq[9:18] < base[9:18]) & (inv_freq[9:18] > base[9:18] / 32))


def test_plain_rope_matches_transformers_default():
    cfg = ModelConfig.tiny(rope_type="default", rope_scaling_factor=1.0)
    hf_cfg = transformers.GptOssConfig(**{**cfg.to_hf(), "rope_parameters": {"rope_type": "default",
                                                                             "rope_theta": cfg.rope_theta}})
    want, want_conc = hf.GptOssRotaryEmbedding.compute_default_rope_parameters(hf_cfg)
    got, conc = inv_freq_and_concentration(cfg)
    np.testing.assert_allclose(got, want.numpy(), rtol=2e-6)
    assert conc == want_conc == 1.0


@pytest.mark.parametrize("name", ["20b", "tiny"])
def test_rope_tables_match_transformers_rotary_embedding(name):
    cfg = ModelConfig.gpt_oss_20b() if name == "20b" else ModelConfig.tiny()
    hf_cfg = transformers.GptOssConfig(**HF_20B_ROPE) if name == "20b" else transformers.GptOssConfig(**cfg.to_hf())
    pos = np.array([[0, 1, 2, 7, 127, 128, 4095], [4096, 5000, 20000, 65535, 100000, 131071, 3]], np.int32)
    cos, sin = rope_tables(cfg, jnp.asarray(pos))
    want_cos, want_sin = hf.GptOssRotaryEmbedding(hf_cfg)(torch.zeros(1, dtype=torch.float32),
                                                          torch.from_numpy(pos).long())
    assert cos.shape == (2, 7, cfg.head_dim // 2) and cos.dtype == jnp.float32
    # inv_freq may differ from transformers' by an ulp or two (numpy vs torch pow), which position t
    # amplifies into an angle error of t * inv_freq * 2**-22 at most; plus an ulp or two of cos itself
    inv_freq, conc = inv_freq_and_concentration(cfg)
    tol = 2e-6 + conc * pos[..., None].astype(np.float64) * inv_freq * 2.0**-22
    assert np.all(np.abs(np.asarray(cos) - want_cos.numpy()) <= tol)
    assert np.all(np.abs(np.asarray(sin) - want_sin.numpy()) <= tol)
    # and against float64 numpy on our own (fp32) inv_freq: the angle t * inv_freq is formed in fp32
    angle = (pos[..., None].astype(np.float32) * inv_freq).astype(np.float64)
    np.testing.assert_allclose(np.asarray(cos), conc * np.cos(angle), atol=2e-6)
    np.testing.assert_allclose(np.asarray(sin), conc * np.sin(angle), atol=2e-6)


@pytest.mark.parametrize("shape", [(2, 5, 3, 20), (1, 4, 6, 64)])
def test_apply_rope_matches_transformers(shape):
    B, T, N, H = shape
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape).astype(np.float32)
    angle = rng.uniform(-10, 10, size=(B, T, H // 2)).astype(np.float32)
    cos, sin = np.cos(angle) * 1.3, np.sin(angle) * 1.3
    got = apply_rope(jnp.asarray(x), jnp.asarray(cos), jnp.asarray(sin))
    # transformers: x [B, N, T, H], cos/sin [B, 1, T, H/2]
    want = hf._apply_rotary_emb(torch.from_numpy(x).transpose(1, 2), torch.from_numpy(cos)[:, None],
                                torch.from_numpy(sin)[:, None]).transpose(1, 2).numpy()
    assert got.shape == shape and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)


def test_apply_rope_half_split_pairing_by_hand():
    # H = 4: dim 0 pairs with dim 2, dim 1 with dim 3; rotate by 90 degrees on pair 0 only
    x = jnp.array([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 1, 4)
    cos = jnp.array([0.0, 1.0]).reshape(1, 1, 2)
    sin = jnp.array([1.0, 0.0]).reshape(1, 1, 2)
    got = np.asarray(apply_rope(x, cos, sin)).ravel()
    np.testing.assert_array_equal(got, [1 * 0 - 3 * 1, 2.0, 3 * 0 + 1 * 1, 4.0])


def test_rope_scores_depend_only_on_relative_position():
    cfg = ModelConfig.tiny()
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(1, 1, 1, cfg.head_dim)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 1, 1, cfg.head_dim)), jnp.float32)
    _, conc = inv_freq_and_concentration(cfg)

    def score(tq, tk):
        cq, sq = rope_tables(cfg, jnp.array([[tq]]))
        ck, sk = rope_tables(cfg, jnp.array([[tk]]))
        return float(jnp.sum(apply_rope(q, cq, sq) * apply_rope(k, ck, sk)))

    assert score(7, 3) == pytest.approx(score(40, 36), rel=1e-4)
    assert score(0, 0) == pytest.approx(conc**2 * float(jnp.sum(q * k)), rel=1e-5)
    assert score(7, 3) != pytest.approx(score(7, 4), rel=1e-3)


def test_apply_rope_keeps_bf16():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(2, 3, 4, 20)), jnp.bfloat16)
    cos, sin = rope_tables(ModelConfig.tiny(), jnp.arange(6).reshape(2, 3))
    got = jax.jit(apply_rope)(x, cos, sin)
    assert got.dtype == jnp.bfloat16
    want = apply_rope(x.astype(jnp.float32), cos, sin)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), rtol=1e-2, atol=1e-2)
