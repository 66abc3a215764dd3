"""ModelConfig against the published gpt-oss facts and transformers' own config class."""

import dataclasses
import json
import math

import pytest

from gptoss.config import FULL, SLIDING, ConfigError, ModelConfig, default_layer_types, yarn_low_high

# The hub config.json of gpt-oss-20b as published (rope under `rope_scaling`, theta at top level).
HF_20B = {
    "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "attention_bias": True,
    "attention_dropout": 0.0, "eos_token_id": 200002, "experts_per_token": 4, "head_dim": 64,
    "hidden_act": "silu", "hidden_size": 2880, "initial_context_length": 4096, "initializer_range": 0.02,
    "intermediate_size": 2880, "layer_types": ["sliding_attention", "full_attention"] * 12,
    "max_position_embeddings": 131072, "num_attention_heads": 64, "num_experts_per_tok": 4,
    "num_hidden_layers": 24, "num_key_value_heads": 8, "num_local_experts": 32, "output_router_logits": False,
    "pad_token_id": 199999, "rms_norm_eps": 1e-05,
    "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                     "original_max_position_embeddings": 4096, "rope_type": "yarn", "truncate": False},
    "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
    "tie_word_embeddings": False, "transformers_version": "4.55.0.dev0", "use_cache": True, "vocab_size": 201088,
    "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]},
}

# original/config.json: exactly the reference ModelConfig fields.
ORIGINAL_20B = {
    "num_hidden_layers": 24, "num_experts": 32, "experts_per_token": 4, "vocab_size": 201088,
    "hidden_size": 2880, "intermediate_size": 2880, "swiglu_limit": 7.0, "head_dim": 64,
    "num_attention_heads": 64, "num_key_value_heads": 8, "sliding_window": 128, "initial_context_length": 4096,
    "rope_theta": 150000, "rope_scaling_factor": 32.0, "rope_ntk_alpha": 1.0, "rope_ntk_beta": 32.0,
}


def new_style(hf: dict) -> dict:
    """The same config as newer transformers writes it: `rope_parameters` with rope_theta inside."""
    d = {k: v for k, v in hf.items() if k not in ("rope_scaling", "rope_theta")}
    d["rope_parameters"] = {**hf["rope_scaling"], "rope_theta": hf["rope_theta"]}
    return d


def test_from_hf_matches_preset_20b():
    cfg = ModelConfig.from_hf(HF_20B)
    assert cfg == ModelConfig.gpt_oss_20b()
    assert cfg.rope_type == "yarn" and cfg.rope_truncate is False
    assert (cfg.rope_scaling_factor, cfg.rope_ntk_alpha, cfg.rope_ntk_beta) == (32.0, 1.0, 32.0)
    assert cfg.initial_context_length == 4096 and cfg.rope_theta == 150000.0
    assert (cfg.q_width, cfg.kv_width) == (4096, 512)


def test_rope_scaling_and_rope_parameters_give_same_config():
    assert ModelConfig.from_hf(new_style(HF_20B)) == ModelConfig.from_hf(HF_20B)
    tiny_hf = ModelConfig.tiny().to_hf()
    assert ModelConfig.from_hf(new_style(tiny_hf)) == ModelConfig.tiny()


def test_from_hf_reads_a_file_and_a_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(HF_20B))
    assert ModelConfig.from_hf(tmp_path) == ModelConfig.from_hf(str(tmp_path / "config.json"))
    with pytest.raises(ConfigError, match="not found"):
        ModelConfig.from_hf(tmp_path / "nope.json")


def test_from_hf_without_rope_dict_follows_transformers():
    """transformers' GptOssConfig falls back to gpt-oss's YaRN when config.json has no RoPE dict; so must we."""
    from transformers import GptOssConfig

    d = {k: v for k, v in HF_20B.items() if k not in ("rope_scaling", "rope_theta")}
    theirs = GptOssConfig(**d).rope_parameters
    ours = ModelConfig.from_hf(d)
    assert ours == ModelConfig.from_hf({**d, "rope_parameters": dict(theirs)})
    assert ours.rope_type == "yarn" and ours.rope_scaling_factor == 32.0 and ours.rope_theta == 150000.0


def test_layer_types_default_even_sliding():
    d = {k: v for k, v in HF_20B.items() if k != "layer_types"}
    cfg = ModelConfig.from_hf(d)
    assert cfg.layer_types == tuple(HF_20B["layer_types"])
    assert [cfg.is_sliding(i) for i in range(4)] == [True, False, True, False]
    assert default_layer_types(3) == (SLIDING, FULL, SLIDING)
    cfg = ModelConfig.tiny(num_hidden_layers=5)
    assert cfg.layer_types == (SLIDING, FULL, SLIDING, FULL, SLIDING)


def test_from_original_matches_hf_20b():
    cfg = ModelConfig.from_original(ORIGINAL_20B)
    assert cfg == ModelConfig.from_hf(HF_20B)
    assert cfg.max_position_embeddings == 131072
    assert cfg.layer_types == tuple(HF_20B["layer_types"])


@pytest.mark.parametrize("cfg", [ModelConfig.gpt_oss_20b(), ModelConfig.gpt_oss_120b(), ModelConfig.tiny(),
                                 ModelConfig.tiny(layer_types=(FULL, FULL, SLIDING), eos_token_id=(2, 3)),
                                 ModelConfig.tiny(swiglu_alpha=1.5, swiglu_limit=3.0, rms_norm_eps=1e-6)])
def test_hf_round_trip(cfg):
    d = json.loads(json.dumps(cfg.to_hf()))  # what save_pretrained writes, through JSON
    assert ModelConfig.from_hf(d) == cfg


@pytest.mark.parametrize("cfg", [ModelConfig.gpt_oss_20b(), ModelConfig.gpt_oss_120b()])
def test_original_round_trip_presets(cfg):
    d = cfg.to_original()
    assert set(d) == set(ORIGINAL_20B)  # exactly the reference dataclass fields (it accepts no others)
    assert ModelConfig.from_original(json.loads(json.dumps(d))) == cfg


def test_original_round_trip_tiny():
    cfg = ModelConfig.tiny()
    back = ModelConfig.from_original(cfg.to_original())
    assert back.to_original() == cfg.to_original()
    # original/ carries no token ids or eps; everything architectural survives
    arch = {f.name for f in dataclasses.fields(ModelConfig)} - {"eos_token_id", "pad_token_id"}
    assert {k: getattr(back, k) for k in arch} == {k: getattr(cfg, k) for k in arch}


def test_to_original_rejects_custom_layer_types():
    with pytest.raises(ConfigError, match="layer_types"):
        ModelConfig.tiny(layer_types=(FULL, FULL, FULL)).to_original()


def test_presets_match_facts():
    c20, c120 = ModelConfig.preset("gpt-oss-20b"), ModelConfig.preset("gpt-oss-120b")
    for c in (c20, c120):
        assert (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads) == (2880, 2880, 64, 8)
        assert (c.head_dim, c.vocab_size, c.experts_per_token, c.sliding_window) == (64, 201088, 4, 128)
        assert (c.rope_theta, c.rope_scaling_factor, c.initial_context_length) == (150000.0, 32.0, 4096)
        assert (c.swiglu_limit, c.swiglu_alpha, c.rms_norm_eps) == (7.0, 1.702, 1e-5)
        assert c.max_position_embeddings == 131072 and c.rope_truncate is False
        assert c.layer_types == default_layer_types(c.num_hidden_layers)
    assert (c20.num_hidden_layers, c20.num_experts) == (24, 32)
    assert (c120.num_hidden_layers, c120.num_experts) == (36, 128)
    with pytest.raises(ConfigError, match="unknown preset"):
        ModelConfig.preset("gpt-oss-7b")


def test_num_params_match_facts():
    assert ModelConfig.gpt_oss_20b().num_params() == 20_914_757_184
    assert ModelConfig.gpt_oss_120b().num_params() == 116_829_156_672


def test_yarn_low_high_20b():
    low, high = yarn_low_high(ModelConfig.gpt_oss_20b())
    assert low == pytest.approx(8.092779, abs=1e-6)
    assert high == pytest.approx(17.398024, abs=1e-6)
    # independent formula from the facts: (d/2) ln(L0 / (beta 2 pi)) / ln(base)
    assert low == pytest.approx(32 * math.log(4096 / (32 * 2 * math.pi)) / math.log(150000), rel=1e-12)
    # truncate=true would floor/ceil them (the vLLM bug gpt-oss must not have)
    assert yarn_low_high(ModelConfig.gpt_oss_20b().replace(rope_truncate=True)) == (8, 18)


def test_hf_truncate_default_is_true_when_absent():
    # transformers treats a missing `truncate` as true; only an explicit false keeps the exact bounds
    d = json.loads(json.dumps(HF_20B))
    del d["rope_scaling"]["truncate"]
    assert ModelConfig.from_hf(d).rope_truncate is True


def hf_without(key):
    return {k: v for k, v in HF_20B.items() if k != key}


@pytest.mark.parametrize("change, match", [
    (lambda d: hf_without("head_dim"), "head_dim.*hidden_size/heads is not the head dim"),
    (lambda d: {**d, "num_experts_per_tok": 33}, "experts_per_token=33 exceeds num_experts=32"),
    (lambda d: {**d, "num_key_value_heads": 7}, "not a multiple of num_key_value_heads=7"),
    (lambda d: {**d, "layer_types": d["layer_types"][:5]}, "layer_types has 5 entries but num_hidden_layers=24"),
    (lambda d: {**d, "layer_types": ["sliding_attention", "chunked"] * 12}, "unknown entries.*chunked"),
    (lambda d: {**d, "model_type": "llama"}, "model_type"),
    (lambda d: {**d, "tie_word_embeddings": True}, "untied"),
    (lambda d: hf_without("num_local_experts"), "num_local_experts"),
    (lambda d: {**d, "hidden_size": 0}, "hidden_size must be a positive integer"),
    (lambda d: {**d, "rope_scaling": {**d["rope_scaling"], "mscale": 1.0}}, "mscale"),
    (lambda d: {**d, "rope_scaling": {**d["rope_scaling"], "rope_type": "longrope"}}, "longrope"),
])
def test_from_hf_validation_errors(change, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_hf(change(HF_20B))


def test_direct_construction_validation():
    with pytest.raises(ConfigError, match="head_dim"):
        ModelConfig.tiny(head_dim=7)
    with pytest.raises(ConfigError, match="exceeds num_experts"):
        ModelConfig.tiny(experts_per_token=6)
    with pytest.raises(ConfigError, match="multiple of num_key_value_heads"):
        ModelConfig.tiny(num_key_value_heads=4)
    with pytest.raises(ConfigError, match="layer_types has 2 entries"):
        ModelConfig.tiny(layer_types=(SLIDING, FULL))
    with pytest.raises(ConfigError, match="positive integer"):
        ModelConfig.tiny(vocab_size=True)
    with pytest.raises(ConfigError, match="positive integer"):
        ModelConfig.tiny(num_experts=2.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ModelConfig.tiny().hidden_size = 3  # type: ignore[misc]


def test_from_original_missing_field():
    d = {k: v for k, v in ORIGINAL_20B.items() if k != "head_dim"}
    with pytest.raises(ConfigError, match="head_dim"):
        ModelConfig.from_original(d)


def test_check_mxfp4():
    ModelConfig.gpt_oss_20b().check_mxfp4()
    ModelConfig.tiny().check_mxfp4()
    with pytest.raises(ConfigError, match=r"hidden_size=100 is not a multiple of 32.*dense"):
        ModelConfig.tiny(hidden_size=100).check_mxfp4()
    with pytest.raises(ConfigError, match=r"intermediate_size=48"):
        ModelConfig.tiny(intermediate_size=48).check_mxfp4()


def test_tiny_tensor_axes_are_distinct():
    c = ModelConfig.tiny()
    dims = [c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
            c.num_experts, c.experts_per_token, c.vocab_size, 2 * c.intermediate_size, c.q_width, c.kv_width]
    assert len(set(dims)) == len(dims)


@pytest.mark.parametrize("cfg", [ModelConfig.tiny(), ModelConfig.gpt_oss_20b(),
                                 ModelConfig.tiny(swiglu_alpha=1.5, swiglu_limit=3.0, rms_norm_eps=1e-6)])
def test_transformers_reads_our_hf_dict(cfg):
    transformers = pytest.importorskip("transformers")
    hf = transformers.GptOssConfig(**cfg.to_hf())
    assert hf.vocab_size == cfg.vocab_size and hf.hidden_size == cfg.hidden_size
    assert hf.intermediate_size == cfg.intermediate_size and hf.num_hidden_layers == cfg.num_hidden_layers
    assert hf.num_attention_heads == cfg.num_attention_heads
    assert hf.num_key_value_heads == cfg.num_key_value_heads and hf.head_dim == cfg.head_dim
    assert hf.num_local_experts == cfg.num_experts and hf.num_experts_per_tok == cfg.experts_per_token
    assert hf.sliding_window == cfg.sliding_window and list(hf.layer_types) == list(cfg.layer_types)
    assert hf.rms_norm_eps == cfg.rms_norm_eps and hf.swiglu_limit == cfg.swiglu_limit
    assert hf.swiglu_alpha == cfg.swiglu_alpha and hf.tie_word_embeddings is False
    assert hf.max_position_embeddings == cfg.max_position_embeddings
    rope = hf.rope_parameters
    assert rope["rope_type"] == "yarn" and rope["rope_theta"] == cfg.rope_theta
    assert rope["factor"] == cfg.rope_scaling_factor and rope["truncate"] is False
    assert rope["beta_fast"] == cfg.rope_ntk_beta and rope["beta_slow"] == cfg.rope_ntk_alpha
    assert rope["original_max_position_embeddings"] == cfg.initial_context_length
    # and what transformers writes back is read to the same config
    assert ModelConfig.from_hf(hf.to_dict()) == cfg


def test_transformers_default_config_is_120b():
    transformers = pytest.importorskip("transformers")
    d = transformers.GptOssConfig().to_dict()
    d.update(eos_token_id=200002, pad_token_id=199999)
    assert ModelConfig.from_hf(d) == ModelConfig.gpt_oss_120b()
