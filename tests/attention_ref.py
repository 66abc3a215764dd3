"""Attention with sinks and a sliding window in float64 numpy, vectorized (facts §4.3): the oracle of the flash
paths at sizes where the one-query-at-a-time loop in tests/layers/test_attention.py would be slow."""

from __future__ import annotations

import numpy as np


def attend_ref(q, k, v, sinks, q_pos, k_pos, window, scale):
    """q [B, T, N, H], k/v [B, S, K, H], sinks [N], positions [B, T] / [B, S] (negative: never a key)."""
    q, k, v, sinks = (np.asarray(a, np.float64) for a in (q, k, v, sinks))
    q_pos, k_pos = np.asarray(q_pos)[:, :, None], np.asarray(k_pos)[:, None, :]
    N, K = q.shape[2], k.shape[2]
    kv = np.arange(N) // (N // K)
    logits = np.einsum("btnh,bsnh->bnts", q, k[:, :, kv]) * scale
    ok = (k_pos >= 0) & (k_pos <= q_pos)
    if window is not None:
        ok &= k_pos > q_pos - window
    logits = np.where(ok[:, None], logits, -np.inf)
    sink = sinks[None, :, None, None]
    m = np.maximum(logits.max(-1, keepdims=True), sink)
    p = np.exp(logits - m)
    p = p / (p.sum(-1, keepdims=True) + np.exp(sink - m))
    return np.einsum("bnts,bsnh->btnh", p, v[:, :, kv])
