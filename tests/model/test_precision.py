"""fp32 means fp32 on every backend: every matmul a float32 model traces (forward, the generate loop, a gradient)
asks for full precision, since XLA's default lets GPUs and TPUs run fp32 matmuls as TF32 or bf16 passes (logits
were off by up to 9e-3 on an H200). CI has no GPU, so the traced programs are inspected instead. bf16 models keep
the backend's fast default everywhere but in the (tiny, selection-deciding) router."""

from __future__ import annotations

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gptoss import ModelConfig, random_model
from gptoss.engine.generate import _generate_jit, bucket, prepare, row_seeds
from gptoss.engine.sampling import SamplingParams

HIGHEST = jax.lax.Precision.HIGHEST
CFG = ModelConfig.tiny()


def dots(jaxpr, where="") -> list[tuple[str, object, tuple]]:
    """Every dot_general in a (closed) jaxpr and all the jaxprs nested in it: (where, precision, operand dtypes)."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            out.append((f"{where}/{eqn.source_info.name_stack}", eqn.params["precision"],
                        tuple(str(v.aval.dtype) for v in eqn.invars)))
        for name, value in eqn.params.items():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, (jex.Jaxpr, jex.ClosedJaxpr)):
                    out += dots(sub, f"{where}/{eqn.primitive.name}.{name}")
    return out


def full_precision(precision) -> bool:
    pair = precision if isinstance(precision, tuple) else (precision, precision)
    return all(p == HIGHEST for p in pair)


def _tokens(t=9):
    return jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, t)), jnp.int32)


def forward_jaxpr(model, impl):
    graphdef, state = nnx.split(model)
    return jax.make_jaxpr(lambda s, t: nnx.merge(graphdef, s).forward(t, moe_impl=impl))(state, _tokens())


def grad_jaxpr(model, impl):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tokens = _tokens()

    def nll(p):
        logits = nnx.merge(graphdef, p, rest).forward(tokens[:, :-1], moe_impl=impl)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], axis=-1))

    return jax.make_jaxpr(jax.grad(nll))(params)


def generate_jaxpr(model):
    prompts = [[1, 2, 3, 4, 5], [6, 7]]
    toks, pos, lens, cache_len = prepare(model, prompts, 4)
    graphdef, state = nnx.split(model)
    return jax.make_jaxpr(lambda s: _generate_jit(graphdef, s, toks, pos, lens, cache_len, bucket(4), jnp.int32(4),
                                                  SamplingParams().arrays(), np.full(16, -1, np.int32),
                                                  row_seeds(0, len(prompts))))(state)


def _assert_all_full(found, what):
    assert found, f"{what}: no matmul traced at all (the inspection found nothing to check)"
    bad = [(w, p, d) for w, p, d in found if not full_precision(p)]
    assert not bad, f"{what}: {len(bad)} of {len(found)} matmuls without full precision, e.g. {bad[:3]}"


@pytest.mark.parametrize("experts, kernels", [("mxfp4", "auto"), ("mxfp4", "xla"), ("dense", "xla")])
def test_float32_model_asks_every_matmul_for_full_precision(experts, kernels):
    model = random_model(CFG, dtype=jnp.float32, experts=experts, kernels=kernels).add_expert_adapters(2)
    for impl in ("dense", "gather", "grouped"):
        _assert_all_full(dots(forward_jaxpr(model, impl)), f"forward, {experts}, {kernels}, {impl}")
        _assert_all_full(dots(grad_jaxpr(model, impl)), f"gradient, {experts}, {kernels}, {impl}")
    _assert_all_full(dots(generate_jaxpr(model)), f"generate loop, {experts}, {kernels}")


def test_bf16_model_keeps_the_fast_default():
    model = random_model(CFG, dtype=jnp.bfloat16, experts="mxfp4", kernels="xla")
    found = dots(forward_jaxpr(model, "grouped")) + dots(generate_jaxpr(model))
    fast = [d for d in found if d[1] is None]
    router = [d for d in found if full_precision(d[1])]
    # the router is the one full-precision matmul: one per layer per forward (and per generate step function)
    assert fast and all(d[2] == ("float32", "float32") for d in router), router[:3]
    assert len(router) % CFG.num_hidden_layers == 0 and len(router) < len(fast)


def test_the_inspection_bites():
    """A matmul without precision inside nested control flow is found."""
    def f(x):
        return jax.lax.fori_loop(0, 2, lambda i, c: jax.lax.cond(i > 0, lambda: c @ c, lambda: c), x)

    found = dots(jax.make_jaxpr(f)(jnp.eye(3)))
    assert len(found) == 1 and not full_precision(found[0][1])
