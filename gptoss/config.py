"""Model configuration: one frozen dataclass, built from HF or `original/` config files or a preset.

This is the one place that knows the checkpoint config keys; everything else reads `ModelConfig`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import Any

SLIDING = "sliding_attention"
FULL = "full_attention"
MXFP4_BLOCK = 32


HF_DEFAULT_ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                   "original_max_position_embeddings": 4096}


class ConfigError(ValueError):
    """A model config that is incomplete or contradicts itself."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters of a gpt-oss model (names follow the HF config)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_experts: int
    experts_per_token: int
    sliding_window: int
    layer_types: tuple[str, ...] = ()
    rope_theta: float = 150000.0
    rope_type: str = "yarn"  # "yarn" or "default" (plain RoPE)
    rope_scaling_factor: float = 32.0
    rope_ntk_alpha: float = 1.0  # HF beta_slow
    rope_ntk_beta: float = 32.0  # HF beta_fast
    rope_truncate: bool = False
    initial_context_length: int = 4096  # HF rope original_max_position_embeddings
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-5
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    eos_token_id: int | tuple[int, ...] | None = 200002  # config.json's; from_pretrained adds generation_config's
    pad_token_id: int | None = 199999

    def __post_init__(self):
        if not self.layer_types:
            object.__setattr__(self, "layer_types", default_layer_types(self.num_hidden_layers))
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        positive = [
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "num_experts", "experts_per_token", "sliding_window",
            "initial_context_length", "max_position_embeddings",
        ]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads} (GQA groups must be whole)"
            )
        if self.experts_per_token > self.num_experts:
            raise ConfigError(
                f"experts_per_token={self.experts_per_token} exceeds num_experts={self.num_experts}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers="
                f"{self.num_hidden_layers}"
            )
        bad = sorted({t for t in self.layer_types if t not in (SLIDING, FULL)})
        if bad:
            raise ConfigError(f"layer_types has unknown entries {bad}; expected {SLIDING!r} or {FULL!r}")
        if self.rope_type not in ("yarn", "default"):
            raise ConfigError(f"rope_type={self.rope_type!r} is not supported (use 'yarn' or 'default')")
        if self.rope_type == "yarn" and self.rope_scaling_factor < 1.0:
            raise ConfigError(f"YaRN factor must be >= 1, got {self.rope_scaling_factor}")
        if self.rope_theta <= 0 or self.rms_norm_eps <= 0 or self.swiglu_limit <= 0:
            raise ConfigError("rope_theta, rms_norm_eps and swiglu_limit must be positive")

    def check_mxfp4(self) -> None:
        """MXFP4 blocks run along the input axis of both expert matrices: both widths need whole blocks."""
        for name in ("hidden_size", "intermediate_size"):
            value = getattr(self, name)
            if value % MXFP4_BLOCK:
                raise ConfigError(
                    f"{name}={value} is not a multiple of {MXFP4_BLOCK}, so MXFP4 experts are impossible; "
                    "load the experts dense (experts='dense')"
                )

    # ------------------------------------------------------------------ derived
    @property
    def q_width(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """eos_token_id as a tuple: the default stop ids of generation."""
        if self.eos_token_id is None:
            return ()
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def from_hf(cls, config: Mapping[str, Any] | str | os.PathLike) -> ModelConfig:
        """Builds from a transformers `config.json` (path or dict); accepts `rope_scaling` or `rope_parameters`."""
        d, where = _load_json(config)
        if d.get("model_type", "gpt_oss") != "gpt_oss":
            raise ConfigError(f"{where}: model_type is {d.get('model_type')!r}, expected 'gpt_oss'")
        if d.get("tie_word_embeddings", False):
            raise ConfigError(f"{where}: tie_word_embeddings=true, but gpt-oss has an untied lm_head")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "head_dim", "sliding_window"):
            if d.get(key) is None:
                hint = ""
                if key == "head_dim":
                    hint = " (gpt-oss sets it explicitly: hidden_size/heads is not the head dim)"
                raise ConfigError(f"{where}: required field {key!r} is missing{hint}")
        experts = d.get("num_local_experts", d.get("num_experts"))
        if experts is None:
            raise ConfigError(f"{where}: required field 'num_local_experts' is missing")
        top_k = d.get("num_experts_per_tok", d.get("experts_per_token"))
        if top_k is None:
            raise ConfigError(f"{where}: required field 'num_experts_per_tok' is missing")
        # Without a RoPE dict transformers' GptOssConfig falls back to gpt-oss's YaRN; so do we.
        rope = d.get("rope_parameters") or d.get("rope_scaling") or dict(HF_DEFAULT_ROPE)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        theta = rope.get("rope_theta", d.get("rope_theta", 150000.0))
        kwargs: dict[str, Any] = dict(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"], num_key_value_heads=d["num_key_value_heads"],
            head_dim=d["head_dim"], num_experts=experts, experts_per_token=top_k,
            sliding_window=d["sliding_window"], layer_types=tuple(d.get("layer_types") or ()),
            rope_theta=float(theta), rope_type=rope_type,
            max_position_embeddings=d.get("max_position_embeddings", 131072),
            rms_norm_eps=d.get("rms_norm_eps", 1e-5), swiglu_limit=d.get("swiglu_limit", 7.0),
            swiglu_alpha=d.get("swiglu_alpha", 1.702),
            eos_token_id=d.get("eos_token_id"), pad_token_id=d.get("pad_token_id"),
        )
        if rope_type == "yarn":
            kwargs.update(
                rope_scaling_factor=float(rope.get("factor", 32.0)),
                rope_ntk_alpha=float(rope.get("beta_slow", 1.0)),
                rope_ntk_beta=float(rope.get("beta_fast", 32.0)),
                rope_truncate=bool(rope.get("truncate", True)),
                initial_context_length=int(rope.get("original_max_position_embeddings", 4096)),
            )
            for unsupported in ("attention_factor", "mscale", "mscale_all_dim"):
                if rope.get(unsupported) is not None:
                    raise ConfigError(f"{where}: YaRN option {unsupported!r} is not supported by gpt-oss")
        elif rope_type == "default":
            kwargs.update(rope_scaling_factor=1.0)
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    def to_hf(self) -> dict[str, Any]:
        """The transformers `config.json` dict (written by save_pretrained)."""
        d: dict[str, Any] = {
            "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim, "num_local_experts": self.num_experts,
            "num_experts_per_tok": self.experts_per_token, "experts_per_token": self.experts_per_token,
            "sliding_window": self.sliding_window, "layer_types": list(self.layer_types),
            "max_position_embeddings": self.max_position_embeddings, "rms_norm_eps": self.rms_norm_eps,
            "swiglu_limit": self.swiglu_limit, "swiglu_alpha": self.swiglu_alpha,
            "rope_theta": self.rope_theta, "attention_bias": True,
            "attention_dropout": 0.0, "hidden_act": "silu", "initializer_range": 0.02,
            "router_aux_loss_coef": 0.9, "output_router_logits": False, "tie_word_embeddings": False,
            "use_cache": True,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }
        if self.rope_type == "yarn":
            d["rope_scaling"] = {
                "rope_type": "yarn", "factor": self.rope_scaling_factor, "beta_fast": self.rope_ntk_beta,
                "beta_slow": self.rope_ntk_alpha, "truncate": self.rope_truncate,
                "original_max_position_embeddings": self.initial_context_length,
            }
        return d

    # ------------------------------------------------------------------ original/config.json
    @classmethod
    def from_original(cls, config: Mapping[str, Any] | str | os.PathLike) -> ModelConfig:
        """Builds from the reference `original/config.json` (even layers slide, YaRN always on)."""
        d, where = _load_json(config)
        required = ("num_hidden_layers", "num_experts", "experts_per_token", "vocab_size", "hidden_size",
                    "intermediate_size", "head_dim", "num_attention_heads", "num_key_value_heads",
                    "sliding_window")
        for key in required:
            if d.get(key) is None:
                raise ConfigError(f"{where}: required field {key!r} is missing")
        factor = float(d.get("rope_scaling_factor", 32.0))
        ctx = int(d.get("initial_context_length", 4096))
        try:
            return cls(
                vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
                intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
                num_attention_heads=d["num_attention_heads"], num_key_value_heads=d["num_key_value_heads"],
                head_dim=d["head_dim"], num_experts=d["num_experts"], experts_per_token=d["experts_per_token"],
                sliding_window=d["sliding_window"], rope_theta=float(d.get("rope_theta", 150000.0)),
                rope_type="yarn" if factor > 1.0 else "default", rope_scaling_factor=factor,
                rope_ntk_alpha=float(d.get("rope_ntk_alpha", 1.0)),
                rope_ntk_beta=float(d.get("rope_ntk_beta", 32.0)), rope_truncate=False,
                initial_context_length=ctx, max_position_embeddings=int(ctx * factor),
                swiglu_limit=float(d.get("swiglu_limit", 7.0)),
            )
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    def to_original(self) -> dict[str, Any]:
        if self.layer_types != default_layer_types(self.num_hidden_layers):
            raise ConfigError("the original/ layout cannot express layer_types other than even=sliding")
        return {
            "num_hidden_layers": self.num_hidden_layers, "num_experts": self.num_experts,
            "experts_per_token": self.experts_per_token, "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "swiglu_limit": self.swiglu_limit, "head_dim": self.head_dim,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "sliding_window": self.sliding_window, "initial_context_length": self.initial_context_length,
            "rope_theta": self.rope_theta, "rope_scaling_factor": self.rope_scaling_factor,
            "rope_ntk_alpha": self.rope_ntk_alpha, "rope_ntk_beta": self.rope_ntk_beta,
        }

    # ------------------------------------------------------------------ presets
    @classmethod
    def gpt_oss_20b(cls) -> ModelConfig:
        return cls(vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=24,
                   num_attention_heads=64, num_key_value_heads=8, head_dim=64, num_experts=32,
                   experts_per_token=4, sliding_window=128)

    @classmethod
    def gpt_oss_120b(cls) -> ModelConfig:
        return cls.gpt_oss_20b().replace(num_hidden_layers=36, num_experts=128,
                                         layer_types=default_layer_types(36))

    @classmethod
    def tiny(cls, **overrides: Any) -> ModelConfig:
        """A tiny config whose dimensions are all distinct (so a transposed or mixed-up axis fails loudly)."""
        base = dict(vocab_size=331, hidden_size=96, intermediate_size=64, num_hidden_layers=3,
                    num_attention_heads=6, num_key_value_heads=2, head_dim=20, num_experts=5,
                    experts_per_token=3, sliding_window=5, rope_theta=10000.0, rope_scaling_factor=4.0,
                    initial_context_length=32, max_position_embeddings=128, eos_token_id=2,
                    pad_token_id=0)
        base.update(overrides)
        if "num_hidden_layers" in overrides and "layer_types" not in overrides:
            base["layer_types"] = default_layer_types(base["num_hidden_layers"])
        return cls(**base)

    @classmethod
    def preset(cls, name: str) -> ModelConfig:
        presets = {"gpt-oss-20b": cls.gpt_oss_20b, "gpt-oss-120b": cls.gpt_oss_120b, "tiny": cls.tiny}
        if name not in presets:
            raise ConfigError(f"unknown preset {name!r}; known: {sorted(presets)}")
        return presets[name]()

    # ------------------------------------------------------------------ sizes
    def num_params(self) -> int:
        D, I, E, V = self.hidden_size, self.intermediate_size, self.num_experts, self.vocab_size
        attn = D * (self.q_width + 2 * self.kv_width) + self.q_width + 2 * self.kv_width
        attn += self.q_width * D + D + self.num_attention_heads + D
        mlp = E * (2 * I * D + 2 * I + D * I + D) + E * D + E + D
        return self.num_hidden_layers * (attn + mlp) + 2 * V * D + D


def default_layer_types(num_layers: int) -> tuple[str, ...]:
    """gpt-oss alternates: even layers slide, odd layers attend to everything."""
    return tuple(SLIDING if i % 2 == 0 else FULL for i in range(num_layers))


def yarn_low_high(cfg: ModelConfig) -> tuple[float, float]:
    """The YaRN ramp bounds in rotary-pair index units (gpt-oss: 8.0928 / 17.3980, never rounded)."""
    d, base, ctx = cfg.head_dim, cfg.rope_theta, cfg.initial_context_length

    def correction_dim(rotations: float) -> float:
        return d * math.log(ctx / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(cfg.rope_ntk_beta), correction_dim(cfg.rope_ntk_alpha)
    if cfg.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0.0), min(high, d - 1.0)


def _load_json(config: Mapping[str, Any] | str | os.PathLike) -> tuple[dict[str, Any], str]:
    if isinstance(config, Mapping):
        return dict(config), "config"
    path = os.fspath(config)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    try:
        with open(path) as f:
            return json.load(f), path
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None


# The embedded demo model (`from_pretrained("demo")`, `load_tokenizer("demo")`, `--model demo`), trained by
# configs/train/demo.yaml.
DEMO_NAME = "demo"
DEMO_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_model")


def local_folder(path: str | os.PathLike) -> str | None:
    """The local folder a model name stands for ("demo": the packaged demo model), or None for a hub id."""
    path = os.fspath(path)
    if os.path.exists(path):
        return path
    if path == DEMO_NAME:
        return DEMO_DIR
    return None
