"""Train-state checkpoints (gptoss.train.checkpoint): a state written with the attention weights' old names and
[in..., out...] layout (before 2026-12-02) restores into today's [out..., in...] parameters."""

from __future__ import annotations

import numpy as np
import pytest

from gptoss.train.checkpoint import Checkpoints


def _attn(rng, old: bool, D=5, N=3, K=2, H=4):
    if old:
        return {"wq_DNH": rng.normal(size=(D, N, H)), "wk_DKH": rng.normal(size=(D, K, H)),
                "wv_DKH": rng.normal(size=(D, K, H)), "wo_NHD": rng.normal(size=(N, H, D)),
                "bq_NH": rng.normal(size=(N, H))}
    return {"wq_NHD": np.zeros((N, H, D)), "wk_KHD": np.zeros((K, H, D)), "wv_KHD": np.zeros((K, H, D)),
            "wo_DNH": np.zeros((D, N, H)), "bq_NH": np.zeros((N, H))}


def _state(rng, old: bool):
    f32 = lambda tree: {k: np.asarray(v, np.float32) for k, v in tree.items()}  # noqa: E731
    return {"params": {"layers": [{"attn": f32(_attn(rng, old))}]},
            "opt": {"mu": {"layers": [{"attn": f32(_attn(rng, old))}]}}, "step": np.int32(7)}


def test_restores_a_state_from_before_the_attention_layout_change(tmp_path):
    rng = np.random.default_rng(0)
    old = _state(rng, old=True)
    ckpts = Checkpoints(tmp_path / "ckpt")
    ckpts.save(7, old, {"position": 11})
    state, extra = ckpts.restore(7, _state(rng, old=False))
    assert extra == {"position": 11} and int(state["step"]) == 7
    for part in ("params", "opt"):
        was = old[part] if part == "params" else old[part]["mu"]
        now = state[part] if part == "params" else state[part]["mu"]
        a, b = was["layers"][0]["attn"], now["layers"][0]["attn"]
        np.testing.assert_array_equal(np.einsum("dnh->nhd", a["wq_DNH"]), b["wq_NHD"])
        np.testing.assert_array_equal(np.einsum("dkh->khd", a["wk_DKH"]), b["wk_KHD"])
        np.testing.assert_array_equal(np.einsum("dkh->khd", a["wv_DKH"]), b["wv_KHD"])
        np.testing.assert_array_equal(np.einsum("nhd->dnh", a["wo_NHD"]), b["wo_DNH"])
        np.testing.assert_array_equal(a["bq_NH"], b["bq_NH"])
    ckpts.close()


def test_a_different_model_is_still_an_error(tmp_path):
    rng = np.random.default_rng(1)
    ckpts = Checkpoints(tmp_path / "ckpt")
    ckpts.save(1, {"params": {"w": np.ones((2, 3), np.float32)}}, {})
    with pytest.raises(Exception, match="wq_NHD|lacks|structure|match"):  # orbax's message, or ours
        ckpts.restore(1, _state(rng, old=False))
    ckpts.close()
