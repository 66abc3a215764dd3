"""The bf16 tiny model with the dense CPU kernel on vs off: matching logits, identical greedy generation."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

import gptoss
from gptoss.engine import generate
from gptoss.kernels import dense_cpu

pytestmark = pytest.mark.skipif(not dense_cpu.kernel_available() or jax.default_backend() != "cpu",
                                reason=f"dense CPU kernel unavailable: {dense_cpu.load_error()}")


@pytest.fixture(scope="module")
def bf16_model(bf16_mxfp4_ckpt):
    return gptoss.from_pretrained(bf16_mxfp4_ckpt[0], dtype="bfloat16", experts="mxfp4", progress=False)


def _forward(model, tokens, kernels):
    model.kernels = kernels
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda state, t: nnx.merge(graphdef, state).forward(t))
    # the compiled module: layers of one type share a jitted block, which XLA inlines once per call
    return fn.lower(state, tokens).compile().as_text(), np.asarray(fn(state, tokens))


def test_logits_with_kernel_on_and_off(bf16_model):
    tokens = np.random.default_rng(3).integers(0, 331, (2, 2), dtype=np.int32)  # 4 tokens: every projection
    # takes the kernel, the logits too
    assert tokens.size <= dense_cpu.MAX_TOKENS_VS_BF16_GEMM
    hlo, on = _forward(bf16_model, tokens, "cpu")
    hlo_off, off = _forward(bf16_model, tokens, "xla")
    n_layers = bf16_model.config.num_hidden_layers
    # per layer q, k and v in one call, o and the router in two more, then the logits (TARGET is a prefix of
    # TARGET_MANY)
    assert hlo.count(dense_cpu.TARGET_MANY) == n_layers and hlo.count(dense_cpu.TARGET) == 3 * n_layers + 1
    assert dense_cpu.TARGET not in hlo_off
    assert on.dtype == off.dtype == np.float32
    # bf16 activations: the two paths may round a q/k/v/o element differently (fp32 sums in another order)
    np.testing.assert_allclose(on, off, rtol=0, atol=2e-2 * np.abs(off).max())
    assert (on.argmax(-1) == off.argmax(-1)).mean() >= 0.95


def test_greedy_generation_with_kernel_on_and_off(bf16_model, monkeypatch):
    rng = np.random.default_rng(8)
    prompts = [rng.integers(0, 331, n).tolist() for n in (9, 4, 12)]
    traced = []  # token counts of the projections traced onto the kernel
    real = dense_cpu.dense_matmul
    monkeypatch.setattr(dense_cpu, "dense_matmul", lambda x, w, **kw: traced.append(x.shape[0]) or real(x, w, **kw))
    bf16_model.kernels = "cpu"
    on = generate(bf16_model, prompts, max_new_tokens=16)
    assert 3 in traced  # the decode step (3 rows, one token each) ran on the kernel
    bf16_model.kernels = "xla"
    off = generate(bf16_model, prompts, max_new_tokens=16)
    bf16_model.kernels = "auto"
    assert on.tokens == off.tokens
