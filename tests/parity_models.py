"""Tiny transformers gpt-oss oracles and hand-written checkpoints for the parity tests.

Everything here is deterministic: a seed fixes the weights, a seed fixes the tokens. The dims follow
`gptoss.config.ModelConfig.tiny()` (all distinct, so a transposed or mixed-up axis fails loudly). The weights
are re-initialized at scales where the parts that an implementation can get wrong are actually exercised:
the SwiGLU clamp (limit 7) cuts a good fraction of the routed gate/up values, the sinks take a sizeable
share of the attention mass, every bias is nonzero and the router logits are spread out.

Writers:
  * `save_hf_dense`     transformers `save_pretrained` (fp32, dense experts), one safetensors file.
  * `save_hf_mxfp4`     an HF MXFP4 checkpoint written by hand (experts quantized with
                        `gptoss.quant.quantize`, everything else bf16 like the hub files), sharded with an
                        index, hub-style config.json (`rope_scaling`). Returns the transformers oracle that
                        dequantizes it on load.
  * `save_original`     the OpenAI `original/` layout (fused qkv, `block.L.*` names, MXFP4 experts), sharded
                        like the 120b repo (`model--0000k-of-0000n.safetensors`, no index), under
                        `root/original`.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import GptOssConfig, GptOssForCausalLM, Mxfp4Config

SLIDING, FULL = "sliding_attention", "full_attention"
PARITY_SEED = 0  # the weights of the session's parity model
PARITY_T = 40  # parity sequence length: >= 4 x the sliding window (5), past the YaRN original context (32)

# ModelConfig.tiny() as a transformers config.
TINY = dict(
    vocab_size=331, hidden_size=96, intermediate_size=64, num_hidden_layers=3, num_attention_heads=6,
    num_key_value_heads=2, head_dim=20, num_local_experts=5, num_experts_per_tok=3, sliding_window=5,
    layer_types=[SLIDING, FULL, SLIDING], max_position_embeddings=128, rms_norm_eps=1e-5,
    swiglu_limit=7.0, tie_word_embeddings=False, attention_bias=True, eos_token_id=2, pad_token_id=0,
    rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
                     "original_max_position_embeddings": 32, "truncate": False, "rope_theta": 10000.0},
)

# Per-tensor init: (kind, a, b) with kind "normal" (mean a, std b) or "uniform" [a, b). Chosen so that the
# clamp, the sinks, the biases and the router all matter (see tests/model/test_parity.py::test_oracle_*).
INIT = {
    "embed_tokens.weight": ("normal", 0.0, 1.0),
    "input_layernorm.weight": ("uniform", 0.5, 1.5),
    "post_attention_layernorm.weight": ("uniform", 0.5, 1.5),
    "model.norm.weight": ("uniform", 0.5, 1.5),
    "q_proj.weight": ("normal", 0.0, 0.14),
    "k_proj.weight": ("normal", 0.0, 0.14),
    "v_proj.weight": ("normal", 0.0, 96**-0.5),
    "o_proj.weight": ("normal", 0.0, 120**-0.5),
    "q_proj.bias": ("normal", 0.0, 0.3),
    "k_proj.bias": ("normal", 0.0, 0.3),
    "v_proj.bias": ("normal", 0.0, 0.3),
    "o_proj.bias": ("normal", 0.0, 0.3),
    "sinks": ("normal", 1.0, 1.5),
    "router.weight": ("normal", 0.0, 0.3),
    "router.bias": ("normal", 0.0, 0.5),
    "experts.gate_up_proj": ("normal", 0.0, 0.6),
    "experts.gate_up_proj_bias": ("normal", 0.0, 1.0),
    "experts.down_proj": ("normal", 0.0, 0.025),
    "experts.down_proj_bias": ("normal", 0.0, 0.3),
    "lm_head.weight": ("normal", 0.0, 0.3),
}

# A variant for the bf16 test. With INIT, a routing flip at a near-tie (which bf16 rounding causes for ~1 % of
# tokens in any implementation, transformers' own bf16 included) swaps one large random expert output for
# another, and the flat output distribution has many near-tied top-1s: transformers' bf16 then gets only ~96 %
# top-1 agreement with its fp32 self. CONFIDENT makes the experts share most of their weights (a flip changes
# little), the expert outputs and attention logits smaller, and adds a bigram path to the unembedding (a clear
# top-1, mean max-prob ~0.9, as a trained model has) while the clamp still triggers as often as with INIT.
CONFIDENT = dict(
    init={"experts.down_proj": ("normal", 0.0, 0.008), "q_proj.weight": ("normal", 0.0, 0.1),
          "k_proj.weight": ("normal", 0.0, 0.1), "lm_head.weight": ("normal", 0.0, 0.2)},
    bigram=8.0, expert_spread=0.3,
)

MXFP4_NOT_CONVERTED = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
                       "lm_head"]


# -------------------------------------------------------------------------------- models
def hf_config(**overrides) -> GptOssConfig:
    kw = copy.deepcopy(TINY)
    kw.update(overrides)
    if "num_hidden_layers" in overrides and "layer_types" not in overrides:
        kw["layer_types"] = [SLIDING if i % 2 == 0 else FULL for i in range(kw["num_hidden_layers"])]
    return GptOssConfig(**kw)


def make_hf_model(seed: int = 0, *, init: Mapping | None = None, bigram: float = 0.0,
                  expert_spread: float = 1.0, **config_overrides) -> GptOssForCausalLM:
    """A tiny random fp32 transformers gpt-oss (eager attention and experts), deterministically initialized.

    `init` overrides entries of INIT; `bigram` > 0 adds that multiple of a permuted copy of the embedding to
    the unembedding, so the model predicts a fixed successor of the current token with a clear margin (as a
    trained model is confident); `expert_spread` s < 1 mixes every expert tensor (biases too) with a common
    part, s * own + sqrt(1 - s^2) * common (common = one randomly chosen expert's own draw), so that a
    near-tie routing flip changes little; `config_overrides` go to GptOssConfig."""
    config = hf_config(**config_overrides)
    model = GptOssForCausalLM._from_config(config, attn_implementation="eager",
                                           experts_implementation="eager", dtype=torch.float32)
    reinit_(model, seed, init)
    if expert_spread != 1.0:
        g = torch.Generator().manual_seed(seed + 2)
        with torch.no_grad():
            for name, p in sorted(model.named_parameters()):
                if ".experts." in name:
                    shared = p[torch.randint(0, p.shape[0], (), generator=g)].clone()
                    p.mul_(expert_spread).add_((1 - expert_spread**2) ** 0.5 * shared)
    if bigram:
        g = torch.Generator().manual_seed(seed + 1)
        succ = torch.randperm(config.vocab_size, generator=g)  # token t predicts succ[t]
        with torch.no_grad():
            emb = model.model.embed_tokens.weight
            model.lm_head.weight[succ] += bigram * emb / emb.norm(dim=-1, keepdim=True)
    return model.eval()


def reinit_(model: torch.nn.Module, seed: int, init: Mapping | None = None) -> None:
    """Overwrites every parameter from a seeded generator (visiting them in name order)."""
    rules = {**INIT, **(init or {})}
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            kind, a, b = _init_rule(name, rules)
            if kind == "normal":
                value = torch.randn(p.shape, generator=g, dtype=torch.float32) * b + a
            else:
                value = torch.rand(p.shape, generator=g, dtype=torch.float32) * (b - a) + a
            p.copy_(value)


def _init_rule(name: str, rules: Mapping):
    for suffix, rule in rules.items():
        if name.endswith(suffix):
            return rule
    raise KeyError(f"no init rule for parameter {name!r}")


def load_hf(path, *, mxfp4: bool = False) -> GptOssForCausalLM:
    """transformers' fp32 model from a checkpoint dir (MXFP4 experts dequantized exactly on load)."""
    kw = dict(dtype=torch.float32, attn_implementation="eager", experts_implementation="eager")
    if mxfp4:
        kw["quantization_config"] = Mxfp4Config(dequantize=True)
    return GptOssForCausalLM.from_pretrained(os.fspath(path), **kw).eval()


@torch.no_grad()
def hf_forward(model: GptOssForCausalLM, tokens: np.ndarray, *, router: bool = False):
    """fp32 logits [B, T, V] (and router logits [layers, B, T, E]) as numpy."""
    tokens = np.asarray(tokens)
    out = model(torch.from_numpy(tokens.astype(np.int64)), output_router_logits=router)
    logits = out.logits.float().numpy()
    if not router:
        return logits
    B, T = tokens.shape
    return logits, np.stack([r.float().reshape(B, T, -1).numpy() for r in out.router_logits])


def sample_tokens(batch: int, length: int, vocab: int = TINY["vocab_size"], seed: int = 0) -> np.ndarray:
    """int32 [B, T]: Zipf-like ids over a shuffled vocab, with copied spans (so attention sees repeats) and
    both ends of the id range (0 and vocab-1) present."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(vocab)
    probs = 1.0 / np.arange(1, vocab + 1) ** 0.8
    probs /= probs.sum()
    tokens = perm[rng.choice(vocab, size=(batch, length), p=probs)]
    for b in range(batch):
        span = max(2, length // 6)
        src = rng.integers(0, length - 2 * span)
        dst = rng.integers(src + span, length - span + 1)
        tokens[b, dst:dst + span] = tokens[b, src:src + span]
    tokens[0, 1] = 0
    tokens[-1, -2] = vocab - 1
    return tokens.astype(np.int32)


# -------------------------------------------------------------------------------- metrics
def rel_err(ours, ref) -> float:
    """max|ours - ref| / max|ref|."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kl(ref_logits, ours_logits):
    """KL(ref || ours) per position."""
    lp, lq = log_softmax(ref_logits), log_softmax(ours_logits)
    return np.sum(np.exp(lp) * (lp - lq), axis=-1)


def describe_divergence(ours, ref, name="logits") -> str:
    """Where two [B, T, ...] arrays diverge most: batch, position, the first bad position per batch row."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    d = np.abs(ours - ref)
    scale = np.max(np.abs(ref))
    flat = np.unravel_index(np.argmax(d), d.shape)
    per_pos = d.reshape(d.shape[0], d.shape[1], -1).max(-1) / scale
    first_bad = [int(np.argmax(row > 1e-4)) if (row > 1e-4).any() else None for row in per_pos]
    return (f"{name}: max rel err {d.max() / scale:.3e} at index {tuple(int(i) for i in flat)}; "
            f"per-position rel err (batch 0) {np.array2string(per_pos[0], precision=1)}; "
            f"first position over 1e-4 per batch row: {first_bad}")


# -------------------------------------------------------------------------------- capture
@torch.no_grad()
def expert_preactivations(model: GptOssForCausalLM, tokens: np.ndarray):
    """Per layer, the routed experts' gate and up pre-activations (x @ W + b, before the clamp)."""
    captured = []

    def hook(module, args):
        hidden, idx = args[0], args[1]
        tok = torch.arange(hidden.shape[0])[:, None].expand_as(idx).reshape(-1)
        e = idx.reshape(-1)
        h = torch.einsum("ad,adf->af", hidden[tok], module.gate_up_proj[e]) + module.gate_up_proj_bias[e]
        captured.append((h[:, 0::2].numpy(), h[:, 1::2].numpy()))

    handles = [layer.mlp.experts.register_forward_pre_hook(hook) for layer in model.model.layers]
    try:
        model(torch.from_numpy(np.asarray(tokens, np.int64)))
    finally:
        for handle in handles:
            handle.remove()
    return captured


@torch.no_grad()
def sink_mass(model: GptOssForCausalLM, tokens: np.ndarray) -> np.ndarray:
    """Per layer, the attention probability the sink takes: [layers, B, heads, T]."""
    out = model(torch.from_numpy(np.asarray(tokens, np.int64)), output_attentions=True)
    return np.stack([1.0 - a.sum(-1).numpy() for a in out.attentions])


# -------------------------------------------------------------------------------- writers
def _state(model_or_state) -> dict[str, torch.Tensor]:
    if isinstance(model_or_state, Mapping):
        return {k: v.detach() for k, v in model_or_state.items()}
    return {k: v.detach() for k, v in model_or_state.state_dict().items()}


def _config_of(model_or_state, config):
    if config is not None:
        return config
    if isinstance(model_or_state, Mapping):
        raise ValueError("pass config= when writing from a state dict")
    return model_or_state.config


def quantize_experts(w_in_out: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """transformers' [E, in, out] expert matrix -> checkpoint [E, out, in] MXFP4 (blocks, scales)."""
    from gptoss.quant import quantize

    q = quantize(np.ascontiguousarray(w_in_out.float().numpy().transpose(0, 2, 1)))
    return np.array(q.blocks, np.uint8), np.array(q.scales, np.uint8)


def hf_mxfp4_tensors(model_or_state, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """The HF MXFP4 checkpoint's tensors: experts as *_blocks/*_scales (uint8), the rest cast to `dtype`."""
    out = {}
    for name, t in _state(model_or_state).items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales = quantize_experts(t)
            out[name + "_blocks"] = torch.from_numpy(blocks)
            out[name + "_scales"] = torch.from_numpy(scales)
        else:
            out[name] = t.to(dtype).contiguous()
    return out


def hub_config_dict(config: GptOssConfig, *, mxfp4: bool) -> dict:
    """config.json as the hub writes it: YaRN under `rope_scaling`, rope_theta at the top level."""
    rope = dict(config.rope_parameters)
    theta = rope.pop("rope_theta")
    d = {
        "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss",
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim, "num_local_experts": config.num_local_experts,
        "num_experts_per_tok": config.num_experts_per_tok, "experts_per_token": config.num_experts_per_tok,
        "sliding_window": config.sliding_window, "layer_types": list(config.layer_types),
        "max_position_embeddings": config.max_position_embeddings, "rms_norm_eps": config.rms_norm_eps,
        "swiglu_limit": config.swiglu_limit, "rope_theta": theta, "rope_scaling": rope,
        "attention_bias": True, "attention_dropout": 0.0, "hidden_act": "silu", "initializer_range": 0.02,
        "router_aux_loss_coef": 0.9, "output_router_logits": False, "tie_word_embeddings": False,
        "use_cache": True, "eos_token_id": config.eos_token_id, "pad_token_id": config.pad_token_id,
    }
    if mxfp4:
        d["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": MXFP4_NOT_CONVERTED}
    return d


def save_hf_dense(hf_model: GptOssForCausalLM, path) -> Path:
    """transformers' own writer: fp32, dense experts, one model.safetensors."""
    path = Path(path)
    hf_model.save_pretrained(path, safe_serialization=True)
    return path


def _write_shards(tensors: dict[str, torch.Tensor], path: Path, names: list[str], *, index: bool) -> None:
    """Spreads the tensors round-robin over the shard files (so one layer's tensors span several files)."""
    keys = sorted(tensors)
    shards: dict[str, dict[str, torch.Tensor]] = {n: {} for n in names}
    for i, key in enumerate(keys):
        shards[names[i % len(names)]][key] = tensors[key]
    for fname, part in shards.items():
        save_file(part, os.fspath(path / fname), metadata={"format": "pt"})
    if index:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map = {key: names[i % len(names)] for i, key in enumerate(keys)}
        with open(path / "model.safetensors.index.json", "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def save_hf_mxfp4(hf_model: GptOssForCausalLM, path, *, dtype=torch.bfloat16, num_shards: int = 2,
                  load: bool = True) -> GptOssForCausalLM | None:
    """Writes an HF MXFP4 checkpoint by hand and returns transformers' fp32 model loaded from it (the oracle:
    its experts are the exactly dequantized MXFP4 values, its other weights the stored `dtype` values)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = hf_mxfp4_tensors(hf_model, dtype)
    # the hub names shards model-00000-of-0000N ... model-0000N-of-0000N
    names = [f"model-{i:05d}-of-{num_shards - 1:05d}.safetensors" for i in range(num_shards)]
    _write_shards(tensors, path, names, index=True)
    with open(path / "config.json", "w") as f:
        json.dump(hub_config_dict(hf_model.config, mxfp4=True), f, indent=2)
    return load_hf(path, mxfp4=True) if load else None


def original_tensors(model_or_state, config: GptOssConfig, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """The `original/` checkpoint tensors (facts §2.2) from a transformers state dict."""
    sd = _state(model_or_state)
    out = {
        "embedding.weight": sd["model.embed_tokens.weight"],
        "norm.scale": sd["model.norm.weight"],
        "unembedding.weight": sd["lm_head.weight"],
    }
    for layer in range(config.num_hidden_layers):
        hf, og = f"model.layers.{layer}.", f"block.{layer}."
        attn = hf + "self_attn."
        out[og + "attn.norm.scale"] = sd[hf + "input_layernorm.weight"]
        out[og + "attn.qkv.weight"] = torch.cat([sd[attn + p + "_proj.weight"] for p in "qkv"], dim=0)
        out[og + "attn.qkv.bias"] = torch.cat([sd[attn + p + "_proj.bias"] for p in "qkv"], dim=0)
        out[og + "attn.sinks"] = sd[attn + "sinks"]
        out[og + "attn.out.weight"] = sd[attn + "o_proj.weight"]
        out[og + "attn.out.bias"] = sd[attn + "o_proj.bias"]
        out[og + "mlp.norm.scale"] = sd[hf + "post_attention_layernorm.weight"]
        out[og + "mlp.gate.weight"] = sd[hf + "mlp.router.weight"]
        out[og + "mlp.gate.bias"] = sd[hf + "mlp.router.bias"]
        for ours, theirs in (("mlp1", "gate_up_proj"), ("mlp2", "down_proj")):
            blocks, scales = quantize_experts(sd[hf + "mlp.experts." + theirs])
            out[og + f"mlp.{ours}_weight.blocks"] = torch.from_numpy(blocks)
            out[og + f"mlp.{ours}_weight.scales"] = torch.from_numpy(scales)
            out[og + f"mlp.{ours}_bias"] = sd[hf + f"mlp.experts.{theirs}_bias"]
    return {k: (v if v.dtype == torch.uint8 else v.to(dtype)).contiguous() for k, v in out.items()}


def original_config_dict(config: GptOssConfig) -> dict:
    """original/config.json: exactly the reference ModelConfig fields."""
    rope = config.rope_parameters
    even_slides = [SLIDING if i % 2 == 0 else FULL for i in range(config.num_hidden_layers)]
    if list(config.layer_types) != even_slides:
        raise ValueError("the original/ layout can only express even layers sliding, odd layers full")
    return {
        "num_hidden_layers": config.num_hidden_layers, "num_experts": config.num_local_experts,
        "experts_per_token": config.num_experts_per_tok, "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
        "swiglu_limit": config.swiglu_limit, "head_dim": config.head_dim,
        "num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads,
        "sliding_window": config.sliding_window,
        "initial_context_length": rope["original_max_position_embeddings"],
        "rope_theta": rope["rope_theta"], "rope_scaling_factor": rope["factor"],
        "rope_ntk_alpha": rope["beta_slow"], "rope_ntk_beta": rope["beta_fast"],
    }


def save_original(hf_model_or_state, root, *, config: GptOssConfig | None = None, dtype=torch.bfloat16,
                  num_shards: int = 2) -> Path:
    """Writes `root/original/{config.json, model--0000k-of-0000n.safetensors}` (a hub-snapshot-like root that
    holds nothing else). Returns `root`."""
    config = _config_of(hf_model_or_state, config)
    root = Path(root)
    orig = root / "original"
    orig.mkdir(parents=True, exist_ok=True)
    tensors = original_tensors(hf_model_or_state, config, dtype)
    names = [f"model--{i + 1:05d}-of-{num_shards:05d}.safetensors" for i in range(num_shards)]
    _write_shards(tensors, orig, names, index=False)
    with open(orig / "config.json", "w") as f:
        json.dump(original_config_dict(config), f, indent=2)
    return root


# -------------------------------------------------------------------------------- gradients
def hf_nll_grads(model: GptOssForCausalLM, tokens: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
    """torch autograd of transformers' mean next-token NLL (labels = the tokens): (loss, {param name: grad})."""
    model.zero_grad(set_to_none=True)
    ids = torch.from_numpy(np.asarray(tokens, np.int64))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.detach().float().numpy().copy() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return float(loss.detach()), grads


def our_nll_grads(model, tokens: np.ndarray, moe_impl: str | None = None) -> tuple[float, dict[str, np.ndarray]]:
    """jax.grad of the same loss through a gptoss model, w.r.t. every nnx.Param, renamed and laid out like
    transformers' parameters by the checkpoint key map: (loss, {HF param name: grad})."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from gptoss.io.keymap import hf_entries

    tokens = jnp.asarray(tokens, jnp.int32)

    def nll(m):
        logits = m.forward(tokens[:, :-1], moe_impl=moe_impl)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    loss, g = jax.jit(jax.value_and_grad(lambda p: nll(nnx.merge(graphdef, p, rest))))(params)
    flat = {tuple(path): v.get_value() for path, v in nnx.to_flat_state(g)}
    out = {}
    for entry in hf_entries(model.config, model.experts):
        if entry.kind == "float" and entry.path in flat:
            out[entry.names[0]] = np.asarray(entry.to_ckpt(np.asarray(flat[entry.path], np.float32)))
    return float(loss), out


def grad_errors(ours: dict[str, np.ndarray], ref: dict[str, np.ndarray], pad_token_id: int | None = None
                ) -> dict[str, float]:
    """Per parameter both have: max|ours - ref| / max|ref|. transformers' nn.Embedding(padding_idx=pad) gives the
    pad token's row no gradient (it never trains); ours trains it like any other row, so that row is left out."""
    out = {}
    for n in sorted(ours.keys() & ref.keys()):
        a, b = ours[n], ref[n]
        if n == "model.embed_tokens.weight" and pad_token_id is not None:
            a, b = np.delete(a, pad_token_id, axis=0), np.delete(b, pad_token_id, axis=0)
        out[n] = rel_err(a, b)
    return out
