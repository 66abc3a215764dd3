"""The Pallas kernels lower to Triton for CUDA at gpt-oss shapes, without a GPU: `jax.export` lowers for another
platform, which runs the Pallas Triton lowering (its power-of-two block rules, the primitives it supports) and
stops before PTX. Catches a kernel that only works in interpret mode. The model too, end to end."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax import export

from gptoss import GptOss, ModelConfig
from gptoss.config import default_layer_types
from gptoss.kernels import attention_pallas, mxfp4_pallas
from gptoss.kernels.attention_pallas import flash_attend_pallas
from gptoss.kernels.mxfp4_pallas import mx_gather_pallas, mx_grouped_pallas
from gptoss.quant import MXFP4Array

TRITON = "__gpu$xla.gpu.triton"
S = jax.ShapeDtypeStruct


def lower_for_cuda(fn, *args) -> str:
    exp = export.export(jax.jit(fn), platforms=["cuda"],
                        disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON)])(*args)
    return exp.mlir_module()


E, D = 32, 2880


def _w(n, k):
    return S((E, n, k // 32, 16), jnp.uint8), S((E, n, k // 32), jnp.uint8)


def gather(x, b, s, idx):
    return mx_gather_pallas(x, MXFP4Array(b, s, jnp.bfloat16), idx, interpret=False)


def grouped(x, b, s, counts):
    return mx_grouped_pallas(x, MXFP4Array(b, s, jnp.bfloat16), counts, interpret=False)


def flash(q, k, v, sinks, qp, kp):
    return flash_attend_pallas(q, k, v, sinks, qp, kp, window=128, scale=0.125, interpret=False)


CASES = {
    "gather_gate_up_bf16": (gather, (S((1, D), jnp.bfloat16), *_w(5760, D), S((1, 4), jnp.int32))),
    "gather_down_f32": (gather, (S((4, D), jnp.float32), *_w(D, D), S((4, 1), jnp.int32))),
    "grouped_bf16": (grouped, (S((512, D), jnp.bfloat16), *_w(5760, D), S((E,), jnp.int32))),
    "grouped_f32": (grouped, (S((512, D), jnp.float32), *_w(D, D), S((E,), jnp.int32))),
    "flash_prefill": (flash, (S((1, 300, 64, 64), jnp.bfloat16), S((1, 300, 8, 64), jnp.bfloat16),
                              S((1, 300, 8, 64), jnp.bfloat16), S((64,), jnp.float32), S((1, 300), jnp.int32),
                              S((1, 300), jnp.int32))),
    "flash_decode": (flash, (S((2, 1, 64, 64), jnp.bfloat16), S((2, 1000, 8, 64), jnp.bfloat16),
                             S((2, 1000, 8, 64), jnp.bfloat16), S((64,), jnp.float32), S((2, 1), jnp.int32),
                             S((2, 1000), jnp.int32))),
}


@pytest.mark.parametrize("name", CASES)
def test_kernel_lowers_to_triton(name):
    fn, args = CASES[name]
    assert TRITON in lower_for_cuda(fn, *args)


def test_model_step_lowers_for_cuda_with_the_kernels(monkeypatch):
    """A 2-layer model at gpt-oss-20b widths, kernels="pallas", traced as if on a GPU: prefill of 300 tokens and a
    decode step through the engine's own functions, every expert matmul and attention a Triton call."""
    from gptoss.engine.generate import _decode_step, _prefill

    cfg = ModelConfig.gpt_oss_20b().replace(num_hidden_layers=2, layer_types=default_layer_types(2), vocab_size=2048)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: GptOss(cfg, dtype=jnp.bfloat16, kernels="pallas")))
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # what the kernels and the selection look at
    assert mxfp4_pallas.supports(nnx.merge(graphdef, state).layers[0].mlp.gate_up_EFD[...])
    assert attention_pallas.supports(cfg.head_dim) and not attention_pallas.supports(20)

    def step(state, tokens, positions, lens, tok):
        model = nnx.merge(graphdef, state)
        logits, cache = _prefill(model, tokens, positions, lens, 512)
        return _decode_step(model, tok, lens, cache)[0], logits

    mlir = lower_for_cuda(step, state, S((1, 300), jnp.int32), S((1, 300), jnp.int32), S((1,), jnp.int32),
                          S((1,), jnp.int32))
    # per layer: gate_up + down grouped (prefill) and gathered (decode), flash in prefill and decode
    assert mlir.count(TRITON) >= 2 * 6, mlir.count(TRITON)
