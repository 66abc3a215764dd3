"""Router introspection against transformers' router logits (the tiny fp32 parity model): traces, the aggregates
(load, entropy, co-activation, adjacent-layer agreement) recomputed in numpy from transformers' logits, padding
excluded, and the plots."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from parity_models import hf_forward, sample_tokens

import gptoss
from gptoss.eval import RouterStats, plot_expert_load, plot_token_experts, router_trace


@pytest.fixture(scope="module")
def ours(hf_dense_ckpt):
    return gptoss.from_pretrained(hf_dense_ckpt, dtype="float32", progress=False)


@pytest.fixture(scope="module")
def tokens():
    return sample_tokens(2, 14, seed=5)


@pytest.fixture(scope="module")
def hf_router(parity_hf, tokens):
    with torch.no_grad():
        return hf_forward(parity_hf, tokens, router=True)[1].astype(np.float64)  # [L, B, T, E]


def test_trace_is_transformers_router(ours, tokens, hf_router):
    tr = router_trace(ours, tokens)
    k = ours.config.experts_per_token
    np.testing.assert_allclose(tr["logits"], hf_router, atol=1e-4)
    want = np.argsort(-hf_router, axis=-1)[..., :k]
    np.testing.assert_array_equal(tr["experts"], want)
    top = np.take_along_axis(hf_router, want, -1)
    w = np.exp(top - top.max(-1, keepdims=True))
    np.testing.assert_allclose(tr["weights"], w / w.sum(-1, keepdims=True), atol=1e-5)


def test_stats_equal_numpy_over_real_tokens(ours, tokens, hf_router):
    cfg = ours.config
    L, E, k = cfg.num_hidden_layers, cfg.num_experts, cfg.experts_per_token
    positions = np.broadcast_to(np.arange(14), (2, 14)).copy()
    positions[1, 10:] = -1  # padding in row 1: excluded from every aggregate
    stats = RouterStats.for_model(ours).add(router_trace(ours, tokens, positions))
    real = positions >= 0
    lg = hf_router[:, real]  # [L, N, E] (padding is right-aligned: the real tokens' logits are unchanged)
    top = np.argsort(-lg, axis=-1)[..., :k]
    sel = np.zeros(lg.shape, bool)
    np.put_along_axis(sel, top, True, -1)
    s = stats.summary()
    assert s["tokens"] == real.sum() == 24
    np.testing.assert_allclose(s["expert_load"], sel.sum(1) / sel.sum((1, 2))[:, None], atol=1e-9)
    p = np.exp(lg - lg.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(s["router_entropy"], (-(p * np.log(p)).sum(-1)).mean(1), rtol=1e-4)
    for layer in range(L):
        for i in range(E):
            for j in range(E):
                assert stats.coactivation[layer, i, j] == np.sum(sel[layer, :, i] & sel[layer, :, j])
    agree = [(sel[layer] & sel[layer + 1]).sum(-1).mean() / k for layer in range(L - 1)]
    np.testing.assert_allclose(s["adjacent_layer_agreement"], agree, atol=1e-9)
    assert set(s["agreement_by_pair"]) == {"sliding_attention->full_attention", "full_attention->sliding_attention"}


def test_plots_are_written(ours, tokens, tmp_path):
    tr = router_trace(ours, tokens)
    stats = RouterStats.for_model(ours).add(tr)
    plot_expert_load(stats, str(tmp_path / "load.png"))
    plot_token_experts(tr, [str(t) for t in tokens[0]], path=str(tmp_path / "tokens.png"))
    for name in ("load.png", "tokens.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
