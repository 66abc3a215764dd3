"""Rules, validation, planner, CLI and distributed options: in-process (one device; no mesh is built unless it fits)."""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gptoss
from gptoss import GptOss, ModelConfig, cli, runconfig
from gptoss.apps.inference import InferenceConfig
from gptoss.sharding import (
    CACHE_AXES,
    DEFAULT_RULES,
    MEGATRON_RULES,
    PARAM_AXES,
    Rules,
    ShardingError,
    init_distributed,
    layout_of,
    make_mesh,
    plan,
    resolve,
)
from gptoss.sharding.distributed import distributed_options
from gptoss.sharding.planner import DEVICES, parse_mesh
from gptoss.sharding.rules import spec_for

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
B20, B120 = ModelConfig.gpt_oss_20b(), ModelConfig.gpt_oss_120b()


# ------------------------------------------------------------------------------------------------ rules
def test_every_parameter_has_logical_axes():
    for experts in ("mxfp4", "dense"):
        abstract = nnx.eval_shape(lambda e=experts: GptOss(ModelConfig.tiny(), dtype=jnp.float32, experts=e))
        for path, var in nnx.to_flat_state(nnx.state(abstract)):
            value = var.get_value()
            assert path[-1] in PARAM_AXES, f"{path} has no entry in PARAM_AXES"
            assert len(PARAM_AXES[path[-1]]) == value.ndim, path


def test_rules_refuse_a_mesh_axis_twice_in_one_tensor():
    with pytest.raises(ShardingError, match=r"mesh axis 'tensor' on both 'vocab' and 'embed' of tensor embed_VD"):
        Rules.make({"embed": "tensor"})
    with pytest.raises(ShardingError, match=r"'expert' on both 'experts' and 'expert_ffn'"):
        Rules.make({"expert_ffn": ("tensor", "expert")})
    with pytest.raises(ShardingError, match="unknown logical axis 'expertz'"):
        Rules.make({"expertz": "expert"})
    with pytest.raises(ShardingError, match="unknown mesh axis 'model'"):
        Rules.make({"heads": "model"})
    assert Rules.make(MEGATRON_RULES).axes("expert_ffn_in") == ("tensor",)


def test_spec_never_shards_the_mxfp4_byte_axis():
    rules = Rules.make(MEGATRON_RULES)
    sizes = {"expert": 4, "tensor": 2}
    blocks = spec_for(PARAM_AXES["down_EDI"], (8, 96, 2, 16), sizes, rules)  # [E, D, I/32, 16]
    assert tuple(blocks) == ("expert", None, "tensor")  # the 16-byte axis: unsharded
    with pytest.raises(ShardingError, match=r"dimension 2 \(logical axis 'expert_ffn_in', size 3\)"):
        spec_for(PARAM_AXES["down_EDI"], (8, 96, 3, 16), sizes, rules)
    # soft axes fall back to the longest prefix of their mesh axes that divides them
    assert tuple(spec_for(CACHE_AXES["k_BSKH"], (6, 7, 4, 8), {"data": 2, "expert": 4, "tensor": 8},
                          Rules.make(None))) == ("data",)


def test_which_meshes_serve_20b_and_120b():
    for cfg in (B20, B120):
        for mesh in ({"expert": 8}, {"data": 2, "expert": 4}, {"tensor": 8}, {"expert": 4, "tensor": 2}):
            rules, notes = resolve(cfg, mesh)
            assert notes == ()
    assert resolve(B120, {"expert": 128})[1] == ()
    # 16-way tensor: 8 kv heads are replicated, the rest splits
    rules, notes = resolve(B120, {"tensor": 16})
    assert rules.axes("kv_heads") == () and "num_key_value_heads=8" in notes[0]
    with pytest.raises(ShardingError, match=r"num_experts=32 is not divisible by mesh axis 'expert' \(size 64\)"):
        resolve(B20, {"expert": 64})
    with pytest.raises(ShardingError, match=r"num_attention_heads=64 is not divisible by mesh axis 'tensor' \(size 3"):
        resolve(B20, {"tensor": 3})
    # the real shapes: 90 MXFP4 blocks on the down projection's reduction axis
    with pytest.raises(ShardingError, match=r"intermediate_size/32 = 90 MXFP4 blocks.*'tensor' \(size 4\)"):
        resolve(B120, {"tensor": 4}, MEGATRON_RULES)
    resolve(B120, {"tensor": 2}, MEGATRON_RULES)  # 90 blocks split 2 ways: fine


def test_bad_mesh_names_every_problem():
    with pytest.raises(ShardingError) as e:
        resolve(ModelConfig.tiny(), {"expert": 2, "tensor": 4})  # 5 experts; 6 heads
    msg = str(e.value)
    assert "num_experts=5" in msg and "'expert' (size 2)" in msg
    assert "num_attention_heads=6" in msg and "'tensor' (size 4)" in msg
    with pytest.raises(ShardingError, match="unknown mesh axis 'experts'"):
        resolve(ModelConfig.tiny(), {"experts": 2})


def test_make_mesh_errors():
    with pytest.raises(ShardingError, match=r"needs 8 devices but \d+ are available"):
        make_mesh({"expert": 8} if jax.device_count() < 8 else {"expert": 16})
    mesh = make_mesh({"data": -1})
    assert mesh.shape == {"data": jax.device_count(), "expert": 1, "tensor": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


# ------------------------------------------------------------------------------------------------ loading
@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("sharding_tiny")
    gptoss.save_pretrained(GptOss(ModelConfig.tiny(), dtype=jnp.float32, rngs=nnx.Rngs(1)), path)
    return path


def test_bad_mesh_fails_before_any_weight_is_read(tiny_ckpt, monkeypatch):
    from gptoss.io import load

    def no_reads(*args, **kwargs):
        raise AssertionError("a weight was read before the mesh was checked")

    monkeypatch.setattr(load, "_read", no_reads)
    with pytest.raises(ShardingError, match=r"num_experts=5 is not divisible by mesh axis 'expert' \(size 4\)"):
        gptoss.from_pretrained(tiny_ckpt, mesh={"expert": 4}, progress=False)


def test_single_device_mesh_loads_like_no_mesh(tiny_ckpt):
    tokens = np.arange(20, dtype=np.int32).reshape(2, 10)
    plain = gptoss.from_pretrained(tiny_ckpt, dtype="float32", progress=False)
    sharded = gptoss.from_pretrained(tiny_ckpt, dtype="float32", progress=False, mesh={"data": 1})
    assert layout_of(plain) is None and layout_of(sharded).mesh.shape["data"] == 1
    assert isinstance(sharded.layers[0].mlp.gate_up_EFD[...].blocks, jax.Array)  # copied out of the mmap
    assert plan(str(tiny_ckpt), {}, context=64).model == tiny_ckpt.name  # a checkpoint folder
    np.testing.assert_allclose(np.asarray(sharded(tokens)), np.asarray(plain(tokens)), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------ planner
def test_planner_120b_expert8_exact():
    p = plan("gpt-oss-120b", "expert=8", context=131072, batch=4)
    L, E, D, I, V, N, K, H = 36, 128, 2880, 2880, 201088, 64, 8, 64
    assert p.expert_bytes == L * (E // 8) * (D // 32) * 17 * (2 * I + D)  # 16 bytes + 1 scale per block
    attn = D * N * H + N * H + 2 * (D * K * H + K * H) + N * H * D + D + N
    dense = 2 * V * D + L * (attn + E * D + E + (E // 8) * (2 * I + D))  # expert biases split like experts
    assert p.dense_bytes == 2 * dense + 4 * (2 * L * D + D)  # bf16, norm gains fp32
    full, ring = 131072, 128  # batch 4 does not divide expert=8: the cache is replicated
    assert p.kv_cache_bytes == (L // 2) * sum(4 * s * (2 * K * H * 2 + 4) for s in (full, ring))
    assert p.activation_bytes == max(p.prefill_activation_bytes, p.decode_activation_bytes)
    assert 7.0 < p.expert_bytes / 2**30 < 7.2 and p.total_bytes == p.weight_bytes + p.kv_cache_bytes + \
        p.activation_bytes
    # batch 8 splits over the expert axis (attention is data-parallel there): 1 row per device, not 4
    assert plan("gpt-oss-120b", "expert=8", context=131072, batch=8).kv_cache_bytes * 4 == p.kv_cache_bytes


def test_planner_fits_and_device_table():
    p = plan("gpt-oss-20b", {}, context=4096, batch=1, prefill=256)
    assert p.fits("tpu-v5e-16gb") and p.fits("l4")  # "20b runs within 16 GB"
    assert 12.7 < p.weight_bytes / 2**30 < 12.9  # the model card's 12.8 GiB
    big = plan("gpt-oss-120b", {}, context=4096, batch=1, prefill=256)
    assert 60.6 < big.weight_bytes / 2**30 < 60.9  # 60.8 GiB
    assert big.fits("h100-80gb") and not big.fits("a100-40gb")  # "120b runs on a single 80 GB GPU"
    assert big.total_bytes <= 0.92 * DEVICES["h100-80gb"]
    assert plan("gpt-oss-120b", {"expert": 8}, context=4096, prefill=256).fits("h100-80gb")
    assert "does NOT fit" in plan("gpt-oss-120b", {}, context=131072, batch=4).table(["tpu-v5e-16gb"])
    with pytest.raises(ValueError, match="unknown device"):
        plan("tiny").fits("h900")


def test_parse_mesh():
    assert parse_mesh("data=2,expert=4") == {"data": 2, "expert": 4}
    assert parse_mesh("expert=8") == {"expert": 8} and parse_mesh("") == {} and parse_mesh(None) == {}
    with pytest.raises(ValueError, match="axis=size"):
        parse_mesh("expert:8")


def test_cli_plan(capsys):
    rc = cli.main(["plan", "--model", "gpt-oss-120b", "--mesh", "expert=8", "--context", "131072", "--batch", "4",
                   "--prefill", "16", "--device", "h100-80gb"])
    out = capsys.readouterr().out
    assert rc == 0 and "packed experts" in out and "h100-80gb" in out and "fits" in out
    assert cli.main(["plan", "--model", "gpt-oss-120b", "--device", "v5e"]) == 1  # does not fit: exit 1
    assert "does NOT fit" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ configs, multi-host
def test_8dev_configs():
    big = runconfig.load(os.path.join(ROOT, "configs/inference/gpt-oss-120b-8dev.yaml"), InferenceConfig)
    assert big.model.mesh == {"data": 1, "expert": 8, "tensor": 1}
    resolve(B120, big.model.mesh)
    assert plan("gpt-oss-120b", big.model.mesh, context=8192, batch=2, prefill=512).fits("h100-80gb")
    tiny = runconfig.load(os.path.join(ROOT, "configs/inference/tiny-8dev.yaml"), InferenceConfig)
    assert math.prod(tiny.model.mesh.values()) == 8


def test_distributed_options():
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "2",
           "GPTOSS_PROCESS_ID": "3", "JAX_LOCAL_DEVICE_IDS": "0,1"}
    assert distributed_options(environ=env) == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4,
                                                "process_id": 3, "local_device_ids": [0, 1]}
    assert distributed_options({"process_id": 0}, environ=env)["process_id"] == 0  # config wins
    assert distributed_options(environ={}) == {}
    with pytest.raises(ValueError, match="unknown option 'coordinator'"):
        distributed_options({"coordinator": "x"}, environ={})


def test_init_distributed_is_a_noop_without_configuration(monkeypatch):
    for names in (("GPTOSS_", "JAX_"),):
        for prefix in names:
            for key in ("COORDINATOR_ADDRESS", "NUM_PROCESSES", "PROCESS_ID", "LOCAL_DEVICE_IDS"):
                monkeypatch.delenv(prefix + key, raising=False)
    assert init_distributed() is False
    with pytest.raises(ValueError, match=r"\['num_processes', 'process_id'\] are not"):
        init_distributed({"coordinator_address": "127.0.0.1:1"})


def test_default_rules_cover_every_cache_and_param_axis():
    names = {ax for table in (PARAM_AXES, CACHE_AXES) for axes in table.values() for ax in axes}
    assert names <= set(DEFAULT_RULES)


def test_readme_planner_table_is_what_the_planner_says():
    """Every row of the README's planner table is reproduced by `plan` (totals within 0.05 GiB)."""
    import os
    import re

    from gptoss.sharding import plan

    readme = open(os.path.join(os.path.dirname(__file__), "..", "..", "README.md"), encoding="utf-8").read()
    rows = re.findall(r"^\| (20b|120b) \| ([^|]+) \| (\d+) \| (\d+) \|.*\| \S+ / \S+ \((\d+)\) \| ([\d.]+) \|", readme,
                      flags=re.M)
    assert len(rows) >= 10
    for model, mesh, batch, context, prefill, total in rows:
        mesh = None if mesh.strip() == "1 device" else mesh.replace(" ", "")
        p = plan(f"gpt-oss-{model}", mesh, context=int(context), batch=int(batch), prefill=int(prefill))
        assert abs(p.total_bytes / 2**30 - float(total)) <= 0.05, (model, mesh, batch, context, p.total_bytes / 2**30)


def test_planner_prefill_figure_bounds_the_compiled_prefill(production_compiler_options, tokens=256, context=8192):
    """The planner's prefill activations are an upper bound of XLA's compiled temporaries for generate's prefill
    (forward + cache writes, 2 layers, abstract weights) and not a loose one (within 2x): a 256-token prompt into
    8,192 slots (the attend_flash loop; benchmarks/prefill_memory.py checks 8k and 32k prompts at full width)."""
    from gptoss.config import default_layer_types
    from gptoss.engine import init_cache

    cfg = ModelConfig.gpt_oss_20b().replace(hidden_size=256, intermediate_size=256, num_experts=8, vocab_size=1024,
                                            num_attention_heads=16, num_key_value_heads=4, head_dim=32,
                                            num_hidden_layers=2, layer_types=default_layer_types(2))
    graphdef, state = nnx.split(nnx.eval_shape(lambda: GptOss(cfg, dtype=jnp.bfloat16, kernels="xla")))

    def prefill(state, tokens):
        model = nnx.merge(graphdef, state)
        x, _, cache = model.hidden_states(tokens, tokens, init_cache(cfg, 1, context, model.dtype, None),
                                          in_order=True)
        return x[:, -1], cache

    toks = jax.ShapeDtypeStruct((1, tokens), jnp.int32)
    compiled = jax.jit(prefill).lower(state, toks).compile(compiler_options=production_compiler_options)
    temp = compiled.memory_analysis().temp_size_in_bytes
    est = plan(cfg, None, context=context, prefill=tokens).prefill_activation_bytes
    assert temp <= est <= 2 * temp, (temp / 2**20, est / 2**20)
