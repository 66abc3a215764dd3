"""The train step: LoRA on a frozen MXFP4 base and full training lower the loss; the packed experts stay
bit-identical and nothing but the trainable part changes; gradient accumulation equals one big batch; the
optimizer's schedule and clipping are optax's."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gptoss import ModelConfig, random_model
from gptoss.quant import QuantWeight
from gptoss.train import LoraConfig, LossConfig, OptimConfig, Trainer, add_lora

CFG = ModelConfig.tiny(num_hidden_layers=2)
CFG1 = ModelConfig.tiny(num_hidden_layers=1)


def _batch(seed=0, B=4, T=12):
    t = np.random.default_rng(seed).integers(0, CFG.vocab_size, (B, T + 1)).astype(np.int32)
    w = np.ones((B, T), np.float32)
    w[:, :3] = 0  # a prompt without loss
    return {"inputs": jnp.asarray(t[:, :-1]), "targets": jnp.asarray(t[:, 1:]), "weights": jnp.asarray(w)}


def test_lora_on_mxfp4_base_learns_and_keeps_the_base():
    model = add_lora(random_model(CFG, experts="mxfp4", kernels="xla"), LoraConfig(rank=4, alpha=8))
    packed_before = [(np.asarray(v.get_value().blocks).copy(), np.asarray(v.get_value().scales).copy())
                     for _, v in nnx.to_flat_state(nnx.state(model, QuantWeight))]
    params_before = {k: np.asarray(v.get_value()).copy() for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
                     if not isinstance(v, nnx.LoRAParam)}
    trainer = Trainer(model, "lora", OptimConfig(learning_rate=5e-3, total_steps=16, clip_norm=1.0),
                      LossConfig(aux_loss_coef=0.01, z_loss_coef=1e-3))
    state, batch = trainer.init(), _batch()
    losses = []
    for _ in range(16):
        state, m = trainer.step(state, batch)
        losses.append(float(m["nll"]))
    assert losses[-1] < 0.7 * losses[0], losses
    assert np.isfinite(float(m["grad_norm"])) and m["expert_load"].shape == (2, CFG.num_experts)
    np.testing.assert_allclose(np.asarray(m["expert_load"]).sum(-1), 1.0, rtol=1e-6)
    trained = trainer.model(state)
    for (blocks, scales), (_, v) in zip(packed_before, nnx.to_flat_state(nnx.state(trained, QuantWeight))):
        assert np.array_equal(np.asarray(v.get_value().blocks), blocks)
        assert np.array_equal(np.asarray(v.get_value().scales), scales)
    for k, v in nnx.to_flat_state(nnx.state(trained, nnx.Param)):
        if not isinstance(v, nnx.LoRAParam):
            assert np.array_equal(np.asarray(v.get_value()), params_before[k]), k
    # the model the trainer was built from still works (the steps donate the trainer's own copies)
    assert np.isfinite(np.asarray(model(np.asarray(batch["inputs"])))).all()


def test_full_training_learns_dense_experts():
    model = random_model(CFG, experts="dense", kernels="xla", remat=True)
    trainer = Trainer(model, "full", OptimConfig(learning_rate=3e-3, warmup_steps=3, total_steps=12))
    state, batch = trainer.init(), _batch(1)
    first = None
    for _ in range(12):
        before = np.asarray(state.params["layers"][0]["mlp"]["gate_up_EFD"].get_value())  # the step donates it
        state, m = trainer.step(state, batch)
        first = float(m["nll"]) if first is None else first
    assert float(m["nll"]) < 0.7 * first
    assert not np.array_equal(np.asarray(before), np.asarray(state.params["layers"][0]["mlp"]["gate_up_EFD"]
                                                             .get_value()))


def test_learning_rate_and_accumulation():
    model = add_lora(random_model(CFG1, kernels="xla"), LoraConfig(rank=2))
    optim = OptimConfig(learning_rate=1e-3, warmup_steps=4, total_steps=10, min_lr_ratio=0.2)
    want = optax.warmup_cosine_decay_schedule(0.0, 1e-3, 4, 10, 2e-4)
    trainer = Trainer(model, "lora", optim)
    state = trainer.init()
    for i in range(6):
        state, m = trainer.step(state, _batch(i))
        assert float(m["learning_rate"]) == pytest.approx(float(want(i)), rel=1e-6)

    # two micro-batches of 2 rows accumulate to the update of one 4-row batch (equal token counts per row)
    big = _batch(9)
    halves = [{k: v[:2] for k, v in big.items()}, {k: v[2:] for k, v in big.items()}]
    plain = Trainer(model, "lora", OptimConfig(learning_rate=1e-2, total_steps=4, clip_norm=None))
    accum = Trainer(model, "lora", OptimConfig(learning_rate=1e-2, total_steps=4, clip_norm=None, grad_accum=2))
    s_plain, _ = plain.step(plain.init(), big)
    s_accum = accum.init()
    for h in halves:
        s_accum, _ = accum.step(s_accum, h)
    for a, b in zip(jax.tree.leaves(s_plain.params), jax.tree.leaves(s_accum.params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-6)


def test_lora_dropout_acts_in_steps_only_and_repeats_per_seed():
    def trainer(dropout, seed):
        model = add_lora(random_model(CFG1, kernels="xla"), LoraConfig(rank=2, dropout=dropout))
        return Trainer(model, "lora", OptimConfig(learning_rate=1e-2, total_steps=3), seed=seed)

    def losses(t):
        state, out = t.init(), []
        for i in range(3):
            state, m = t.step(state, _batch(i))
            out.append(float(m["nll"]))
        return out, t.model(state)

    plain, _ = losses(trainer(0.0, 0))
    dropping = trainer(0.5, 0)
    (a, trained), (b, _), (c, _) = losses(dropping), losses(dropping), losses(trainer(0.5, 1))
    assert a[0] == pytest.approx(plain[0], rel=1e-6)  # B starts at zero: adapters add nothing, dropped or not
    assert a == b and a[1:] != pytest.approx(plain[1:], rel=1e-4) and a[1:] != pytest.approx(c[1:], rel=1e-4)
    adapters = [m for blk in trained.layers for m in (blk.attn.adapters, blk.mlp.adapters)]
    assert all(m.dropout == 0.5 and m.dropout_key is None for m in adapters)  # no dropout outside the step


def test_nothing_to_train_is_named():
    with pytest.raises(ValueError, match="add_lora"):
        Trainer(random_model(CFG), "lora", OptimConfig())
    with pytest.raises(ValueError, match="method"):
        Trainer(random_model(CFG), "qlora", OptimConfig())
