"""Checkpoint key maps: the one place that says which checkpoint tensor feeds which model parameter, and how.

Model parameters are named by their NNX state path, e.g. ("layers", 3, "attn", "wq_NHD"). Checkpoint
matrices are [out, in] (PyTorch), and so are ours: attention weights only get their head axes split out (the fused
`original/` qkv rows sliced). Expert matrices keep the checkpoint's [E, out, in] orientation, so MXFP4 bytes pass
straight through; transformers' dense experts are [E, in, out] and are transposed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from gptoss.config import ModelConfig

Path = tuple[str | int, ...]


@dataclass(frozen=True)
class Entry:
    path: Path                           # model state path
    names: tuple[str, ...]               # checkpoint tensor names
    shapes: tuple[tuple[int, ...], ...]  # expected checkpoint shapes, from the config
    kind: str                            # "float" (one float tensor) or "mxfp4" (blocks, scales)
    to_model: Callable[..., np.ndarray] = lambda x: x
    to_ckpt: Callable[[np.ndarray], np.ndarray] = lambda x: x

    @property
    def is_expert_matrix(self) -> bool:
        return self.path[-1] in ("gate_up_EFD", "down_EDI")


def _f(path, name, shape, to_model=lambda x: x, to_ckpt=lambda x: x) -> Entry:
    return Entry(path, (name,), (tuple(shape),), "float", to_model, to_ckpt)


def _heads_in(n: int, h: int, d: int):
    """[n*h, d] projection rows -> [n, h, d] and back."""
    return (lambda w: w.reshape(n, h, d), lambda w: w.reshape(n * h, d))


def _heads_out(n: int, h: int, d: int):
    """o_proj [d, n*h] -> [d, n, h] and back."""
    return (lambda w: w.reshape(d, n, h), lambda w: w.reshape(d, n * h))


def _swap_last(w):
    return np.swapaxes(w, -1, -2)


def hf_entries(cfg: ModelConfig, experts: str) -> list[Entry]:
    """The transformers layout (`model.layers.L...`); experts "mxfp4" (`*_blocks`/`*_scales`) or "dense"."""
    D, N, K, H = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    E, I, V = cfg.num_experts, cfg.intermediate_size, cfg.vocab_size
    out = [_f(("embed_VD",), "model.embed_tokens.weight", (V, D))]
    for L in range(cfg.num_hidden_layers):
        p, a, m = f"model.layers.{L}.", ("layers", L, "attn"), ("layers", L, "mlp")
        out += [
            _f(("layers", L, "attn_norm", "scale_D"), p + "input_layernorm.weight", (D,)),
            _f(a + ("wq_NHD",), p + "self_attn.q_proj.weight", (N * H, D), *_heads_in(N, H, D)),
            _f(a + ("bq_NH",), p + "self_attn.q_proj.bias", (N * H,), lambda b: b.reshape(N, H), np.ravel),
            _f(a + ("wk_KHD",), p + "self_attn.k_proj.weight", (K * H, D), *_heads_in(K, H, D)),
            _f(a + ("bk_KH",), p + "self_attn.k_proj.bias", (K * H,), lambda b: b.reshape(K, H), np.ravel),
            _f(a + ("wv_KHD",), p + "self_attn.v_proj.weight", (K * H, D), *_heads_in(K, H, D)),
            _f(a + ("bv_KH",), p + "self_attn.v_proj.bias", (K * H,), lambda b: b.reshape(K, H), np.ravel),
            _f(a + ("wo_DNH",), p + "self_attn.o_proj.weight", (D, N * H), *_heads_out(N, H, D)),
            _f(a + ("bo_D",), p + "self_attn.o_proj.bias", (D,)),
            _f(a + ("sinks_N",), p + "self_attn.sinks", (N,)),
            _f(("layers", L, "mlp_norm", "scale_D"), p + "post_attention_layernorm.weight", (D,)),
            _f(m + ("router_ED",), p + "mlp.router.weight", (E, D)),
            _f(m + ("router_bias_E",), p + "mlp.router.bias", (E,)),
            _f(m + ("gate_up_bias_EF",), p + "mlp.experts.gate_up_proj_bias", (E, 2 * I)),
            _f(m + ("down_bias_ED",), p + "mlp.experts.down_proj_bias", (E, D)),
        ]
        x = p + "mlp.experts."
        if experts == "mxfp4":
            out += [
                Entry(m + ("gate_up_EFD",), (x + "gate_up_proj_blocks", x + "gate_up_proj_scales"),
                      ((E, 2 * I, D // 32, 16), (E, 2 * I, D // 32)), "mxfp4"),
                Entry(m + ("down_EDI",), (x + "down_proj_blocks", x + "down_proj_scales"),
                      ((E, D, I // 32, 16), (E, D, I // 32)), "mxfp4"),
            ]
        else:
            out += [
                _f(m + ("gate_up_EFD",), x + "gate_up_proj", (E, D, 2 * I), _swap_last, _swap_last),
                _f(m + ("down_EDI",), x + "down_proj", (E, I, D), _swap_last, _swap_last),
            ]
    out += [_f(("norm", "scale_D"), "model.norm.weight", (D,)),
            _f(("unembed_VD",), "lm_head.weight", (V, D))]
    return out


def original_entries(cfg: ModelConfig) -> list[Entry]:
    """OpenAI's `original/` layout: fused qkv rows [q | k | v], MXFP4 experts named mlp1/mlp2."""
    D, N, K, H = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    E, I, V = cfg.num_experts, cfg.intermediate_size, cfg.vocab_size
    q, kv = N * H, K * H
    rows = {"q": (0, q, N), "k": (q, q + kv, K), "v": (q + kv, q + 2 * kv, K)}
    out = [_f(("embed_VD",), "embedding.weight", (V, D))]
    for L in range(cfg.num_hidden_layers):
        p, a, m = f"block.{L}.", ("layers", L, "attn"), ("layers", L, "mlp")
        out.append(_f(("layers", L, "attn_norm", "scale_D"), p + "attn.norm.scale", (D,)))
        for part, (lo, hi, n) in rows.items():
            suffix = "NH" if part == "q" else "KH"
            out.append(_f(a + (f"w{part}_{suffix}D",), p + "attn.qkv.weight", (q + 2 * kv, D),
                          lambda w, lo=lo, hi=hi, n=n: w[lo:hi].reshape(n, H, D)))
            out.append(_f(a + (f"b{part}_{suffix}",), p + "attn.qkv.bias", (q + 2 * kv,),
                          lambda b, lo=lo, hi=hi, n=n: b[lo:hi].reshape(n, H)))
        out += [
            _f(a + ("wo_DNH",), p + "attn.out.weight", (D, q), _heads_out(N, H, D)[0]),
            _f(a + ("bo_D",), p + "attn.out.bias", (D,)),
            _f(a + ("sinks_N",), p + "attn.sinks", (N,)),
            _f(("layers", L, "mlp_norm", "scale_D"), p + "mlp.norm.scale", (D,)),
            _f(m + ("router_ED",), p + "mlp.gate.weight", (E, D)),
            _f(m + ("router_bias_E",), p + "mlp.gate.bias", (E,)),
            Entry(m + ("gate_up_EFD",), (p + "mlp.mlp1_weight.blocks", p + "mlp.mlp1_weight.scales"),
                  ((E, 2 * I, D // 32, 16), (E, 2 * I, D // 32)), "mxfp4"),
            _f(m + ("gate_up_bias_EF",), p + "mlp.mlp1_bias", (E, 2 * I)),
            Entry(m + ("down_EDI",), (p + "mlp.mlp2_weight.blocks", p + "mlp.mlp2_weight.scales"),
                  ((E, D, I // 32, 16), (E, D, I // 32)), "mxfp4"),
            _f(m + ("down_bias_ED",), p + "mlp.mlp2_bias", (E, D)),
        ]
    out += [_f(("norm", "scale_D"), "norm.scale", (D,)), _f(("unembed_VD",), "unembedding.weight", (V, D))]
    return out


HF_PACKED_MARKER = "mlp.experts.gate_up_proj_blocks"
HF_DENSE_MARKER = "mlp.experts.gate_up_proj"
QUANTIZATION_CONFIG = {
    "quant_method": "mxfp4",
    "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
                               "lm_head"],
}
