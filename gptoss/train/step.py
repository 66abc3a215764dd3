"""The optimizer (optax: AdamW, warmup + cosine, clipping, gradient accumulation) and a jitted train step over
the trainable part of a model: its adapters (LoRA) or every float parameter (full training)."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from gptoss.model.packing import dense_format
from gptoss.train.lora import set_dropout_keys
from gptoss.train.loss import cross_entropy_sum, expert_load, load_balancing_loss, router_z_loss

METHODS = ("lora", "full")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 1e-4
    warmup_steps: int = 0
    total_steps: int = 1000
    min_lr_ratio: float = 0.1       # the cosine ends at learning_rate * min_lr_ratio
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float | None = 1.0   # global gradient norm; None: no clipping
    grad_accum: int = 1             # micro-batches per optimizer update

    def schedule(self):
        warmup = min(self.warmup_steps, self.total_steps)
        return optax.warmup_cosine_decay_schedule(
            0.0 if warmup else self.learning_rate, self.learning_rate, warmup, max(self.total_steps, warmup + 1),
            self.learning_rate * self.min_lr_ratio)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    aux_loss_coef: float = 0.0      # MoE load-balancing loss (transformers' router_aux_loss_coef)
    z_loss_coef: float = 0.0        # router z-loss
    chunk: int = 512                # rows of logits computed at once


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    if cfg.grad_accum < 1:
        raise ValueError(f"grad_accum must be >= 1, got {cfg.grad_accum}")
    parts = [] if cfg.clip_norm is None else [optax.clip_by_global_norm(cfg.clip_norm)]
    parts.append(optax.adamw(cfg.schedule(), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay))
    tx = optax.chain(*parts)
    return optax.MultiSteps(tx, cfg.grad_accum) if cfg.grad_accum > 1 else tx


def trainable_filter(method: str):
    """What a method trains: adapters only, or every float parameter (packed experts are never parameters)."""
    if method not in METHODS:
        raise ValueError(f"training method must be one of {METHODS}, got {method!r}")
    return nnx.LoRAParam if method == "lora" else nnx.Param


def loss_and_metrics(model, batch: dict, cfg: LossConfig):
    """Mean masked token NLL (+ weighted auxiliary losses) and metrics. `batch`: `inputs` int [B, T], `targets`
    int [B, T], `weights` float [B, T] (0 where no loss), optional `positions` int [B, T] (default 0..T-1; -1 on
    padding) and `segments` int [B, T] (packed rows: attention stays inside a segment; gptoss.train.data.pack)."""
    inputs = batch["inputs"]
    positions, segments = batch.get("positions"), batch.get("segments")
    in_order = positions is None and segments is None
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(inputs.shape[1], dtype=jnp.int32), inputs.shape)
    x, router_logits, _ = model.hidden_states(inputs, positions, None, in_order=in_order, segments_BT=segments)
    total, count = cross_entropy_sum(x, model.unembed_VD[...], batch["targets"], batch["weights"], chunk=cfg.chunk,
                                     precision=model.runtime().precision)
    nll = total / jnp.maximum(count, 1.0)
    mask = positions >= 0
    top_k = model.config.experts_per_token
    aux = load_balancing_loss(router_logits, top_k, mask)
    z = router_z_loss(router_logits, mask)
    loss = nll + cfg.aux_loss_coef * aux + cfg.z_loss_coef * z
    metrics = {"loss": loss, "nll": nll, "aux_loss": aux, "z_loss": z, "tokens": count,
               "expert_load": expert_load(router_logits, top_k, mask)}
    return loss, metrics


class TrainState(NamedTuple):
    """Everything a step changes (a pytree: orbax saves it as is)."""

    step: jax.Array
    params: Any        # the trainable nnx.State
    opt_state: Any


def _on_mesh_of(params, state: TrainState) -> TrainState:
    """Scalars (the step, optax's counts) replicated on the parameters' mesh: a step returns them there, and a
    single-device input would make the second step compile again (a full recompile on every sharded run)."""
    mesh = next((a.sharding.mesh for a in jax.tree.leaves(params) if isinstance(a.sharding, NamedSharding)), None)
    if mesh is None:
        return state
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda a: a if isinstance(a.sharding, NamedSharding) else jax.device_put(a, replicated),
                        state)


class Trainer:
    """Splits a model into trainable parameters and the rest, and runs jitted optimizer steps on them.

        trainer = Trainer(model, "lora", OptimConfig(learning_rate=1e-3), LossConfig())
        state = trainer.init()
        state, metrics = trainer.step(state, batch)
        trainer.model(state)   # the model with the trained parameters
    """

    def __init__(self, model, method: str, optim: OptimConfig, loss: LossConfig = LossConfig(), *, seed: int = 0):
        self.method = method
        self.seed = seed  # adapter dropout: step n draws its masks from fold_in(key(seed), n), so a resume repeats them
        self.optim = optim
        self.loss = loss
        if method == "full" and dense_format(model) == "bf12":  # packed weights are frozen: they would not train
            raise ValueError("full fine-tuning: the model's dense weights are packed as bf12 (frozen); "
                             "gptoss.unpack_dense(model) first")
        self.graphdef, self.params, self.rest = nnx.split(model, trainable_filter(method), ...)
        if not jax.tree.leaves(self.params):
            raise ValueError(f"method {method!r}: the model has nothing to train"
                             + (" (add adapters with gptoss.train.add_lora first)" if method == "lora" else ""))
        self.tx = make_optimizer(optim)
        self.schedule = optim.schedule()
        self._step = jax.jit(self._step_impl, donate_argnums=(0,))

    def init(self) -> TrainState:
        params = jax.tree.map(jnp.copy, self.params)  # steps donate their state; the model keeps its own arrays
        return _on_mesh_of(params, TrainState(jnp.zeros((), jnp.int32), params, self.tx.init(params)))

    def model(self, state: TrainState):
        return nnx.merge(self.graphdef, state.params, self.rest)

    def step(self, state: TrainState, batch: dict):
        return self._step(state, self.rest, batch)

    def _step_impl(self, state: TrainState, rest, batch):
        def loss_fn(params):
            model = nnx.merge(self.graphdef, params, rest)
            set_dropout_keys(model, jax.random.fold_in(jax.random.key(self.seed), state.step))
            return loss_and_metrics(model, batch, self.loss)

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        micro = self.optim.grad_accum
        metrics = {**metrics, "grad_norm": optax.tree.norm(grads),
                   "learning_rate": self.schedule(state.step // micro)}
        return TrainState(state.step + 1, params, opt_state), metrics
