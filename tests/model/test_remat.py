"""Remat (recompute each block in the backward pass): the same gradients as without it, and the compiled training
step really keeps less memory (XLA:CPU drops optimization barriers, so jax.checkpoint alone saved nothing)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptoss import ModelConfig, random_model
from gptoss.train import LoraConfig, OptimConfig, Trainer, add_lora
from gptoss.train.step import LossConfig, loss_and_metrics

B, T = 2, 64


def _batch(vocab: int, seed: int = 0) -> dict:
    t = np.random.default_rng(seed).integers(0, vocab, (B, T + 1)).astype(np.int32)
    return {"inputs": jnp.asarray(t[:, :-1]), "targets": jnp.asarray(t[:, 1:]), "weights": jnp.ones((B, T))}


def _trainer(layers: int, remat: bool, dtype=jnp.bfloat16) -> Trainer:
    cfg = ModelConfig.tiny(num_hidden_layers=layers)
    model = random_model(cfg, dtype=dtype, experts="mxfp4", moe_impl="grouped", remat=remat)
    lora = add_lora(model, LoraConfig(rank=2))
    rng = np.random.default_rng(1)
    for _, var in nnx.to_flat_state(nnx.state(lora, nnx.LoRAParam)):  # B != 0: every adapter gets a gradient
        v = var.get_value()
        var.set_value(jnp.asarray(0.05 * rng.standard_normal(v.shape), v.dtype))
    return Trainer(lora, "lora", OptimConfig())


def test_remat_gives_the_same_gradients():
    grads = []
    for remat in (False, True):
        tr = _trainer(2, remat, jnp.float32)
        batch = _batch(331)

        def loss(params, tr=tr, batch=batch):
            return loss_and_metrics(nnx.merge(tr.graphdef, params, tr.rest), batch, LossConfig(aux_loss_coef=0.01))[0]

        grads.append(jax.jit(jax.grad(loss))(tr.params))
    leaves = [jax.tree.leaves(g) for g in grads]
    assert len(leaves[0]) == len(leaves[1]) > 0
    for a, b in zip(*leaves):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)
    assert all(float(jnp.abs(a).max()) > 0 for a in leaves[0])


def test_remat_step_keeps_one_layer_of_activations():
    temps = {}
    for remat in (False, True):
        tr = _trainer(4, remat)
        temps[remat] = tr._step.lower(tr.init(), tr.rest, _batch(331)).compile().memory_analysis().temp_size_in_bytes
    assert temps[True] < 0.5 * temps[False], temps
