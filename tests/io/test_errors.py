"""from_pretrained on broken checkpoints: each breakage (made with plain safetensors / json edits) raises
CheckpointError or ConfigError whose message names the culprit tensor, key or file."""

import json
import os
import shutil
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file as np_load_file
from safetensors.numpy import save_file as np_save_file
from safetensors.torch import load_file as torch_load_file
from safetensors.torch import save_file as torch_save_file

import gptoss
from gptoss import CheckpointError, ConfigError, ModelConfig, from_pretrained, save_pretrained

L1 = "model.layers.1."


@pytest.fixture(scope="module")
def base(tmp_path_factory, random_model):
    """Pristine fp32 checkpoints of the tiny config, copied per test: mxfp4 (one file), dense (one file),
    mxfp4 sharded (several files + index)."""
    root = tmp_path_factory.mktemp("errors_base")
    cfg = ModelConfig.tiny()
    mx = random_model(cfg, jnp.float32, "mxfp4", seed=1)
    dense = random_model(cfg, jnp.float32, "dense", seed=2)
    save_pretrained(mx, root / "mxfp4", experts="mxfp4")
    save_pretrained(dense, root / "dense", experts="dense")
    save_pretrained(mx, root / "sharded", experts="mxfp4", max_shard_bytes=60_000)
    return root


@pytest.fixture
def ckpt(base, tmp_path):
    def copy(kind="mxfp4"):
        dst = tmp_path / kind
        shutil.copytree(base / kind, dst)
        return dst
    return copy


def load(path, **kw):
    kw.setdefault("dtype", "float32")
    return from_pretrained(path, progress=False, **kw)


def expect(exc, fn, *parts):
    with pytest.raises(exc) as e:
        fn()
    msg = str(e.value)
    for part in parts:
        assert part in msg, f"{part!r} not in message: {msg}"
    return msg


def edit_tensors(path, fn, file="model.safetensors"):
    """Plain safetensors edit of one file (fp32 + uint8 checkpoints, so the numpy backend does)."""
    f = os.path.join(path, file)
    tensors = np_load_file(f)
    fn(tensors)
    np_save_file(tensors, f, metadata={"format": "pt"})


def edit_config(path, fn):
    f = os.path.join(path, "config.json")
    with open(f) as fh:
        cfg = json.load(fh)
    fn(cfg)
    with open(f, "w") as fh:
        json.dump(cfg, fh)


def test_pristine_checkpoints_load(base):
    for kind in ("mxfp4", "dense", "sharded"):
        load(base / kind, experts="dense" if kind == "dense" else "mxfp4")


# ---------------------------------------------------------------------------------------------- tensor names


@pytest.mark.parametrize("kind,name", [("mxfp4", L1 + "self_attn.k_proj.bias"),
                                       ("mxfp4", L1 + "mlp.experts.down_proj_scales"),
                                       ("dense", L1 + "mlp.experts.down_proj"),
                                       ("mxfp4", "lm_head.weight")])
def test_missing_tensor(ckpt, kind, name):
    path = ckpt(kind)
    edit_tensors(path, lambda t: t.pop(name))
    expect(CheckpointError, lambda: load(path), "missing", name, str(path))


def test_unexpected_tensor(ckpt):
    path = ckpt()
    extra = "model.layers.0.mlp.extra_proj.weight"
    edit_tensors(path, lambda t: t.update({extra: np.zeros((3, 4), np.float32)}))
    expect(CheckpointError, lambda: load(path), "unexpected", extra)


def test_extra_layers_when_config_says_fewer(ckpt):
    path = ckpt()

    def two_layers(c):
        c["num_hidden_layers"] = 2
        c["layer_types"] = c["layer_types"][:2]

    edit_config(path, two_layers)
    msg = expect(CheckpointError, lambda: load(path), "unexpected", "model.layers.2.", "num_hidden_layers=2")
    assert "model.layers.1." not in msg


def test_no_expert_tensors_at_all(ckpt):
    path = ckpt()
    edit_tensors(path, lambda t: [t.pop(n) for n in list(t) if ".mlp.experts." in n and "bias" not in n])
    expect(CheckpointError, lambda: load(path), "no expert tensors", "gate_up_proj")


# ---------------------------------------------------------------------------------------------- shapes, dtypes


@pytest.mark.parametrize("kind,name,bad_shape", [
    ("mxfp4", L1 + "self_attn.q_proj.bias", (121,)),
    ("mxfp4", L1 + "self_attn.o_proj.weight", (120, 96)),       # transposed
    ("mxfp4", L1 + "mlp.experts.gate_up_proj_blocks", (5, 128, 3, 32)),
    ("dense", L1 + "mlp.experts.gate_up_proj", (5, 128, 96)),  # [E, out, in] instead of transformers' [E, in, out]
])
def test_wrong_shape(ckpt, kind, name, bad_shape):
    path = ckpt(kind)

    good = np_load_file(os.path.join(path, "model.safetensors"))[name].shape
    edit_tensors(path, lambda t: t.update({name: np.zeros(bad_shape, t[name].dtype)}))
    expect(CheckpointError, lambda: load(path, experts="dense" if kind == "dense" else "mxfp4"),
           name, str(list(bad_shape)), str(list(good)))


@pytest.mark.parametrize("kind,name,dtype,want", [
    ("mxfp4", L1 + "mlp.experts.gate_up_proj_blocks", np.int32, "uint8"),
    ("mxfp4", L1 + "mlp.experts.down_proj_blocks", np.float32, "uint8"),
    ("mxfp4", L1 + "mlp.experts.down_proj_scales", np.int8, "uint8"),
    ("mxfp4", L1 + "self_attn.q_proj.weight", np.int64, "float"),
    ("mxfp4", "model.norm.weight", np.uint8, "float"),
    ("dense", L1 + "mlp.experts.down_proj", np.int32, "float"),
])
def test_wrong_dtype(ckpt, kind, name, dtype, want):
    path = ckpt(kind)
    edit_tensors(path, lambda t: t.update({name: t[name].astype(dtype)}))
    expect(CheckpointError, lambda: load(path, experts=kind), name, want)


# ---------------------------------------------------------------------------------------------- files


def shards(path):
    return sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))


def test_sharded_base_really_is_sharded(base):
    assert len(shards(base / "sharded")) >= 3
    assert os.path.exists(base / "sharded" / "model.safetensors.index.json")


@pytest.mark.parametrize("which", [0, -1])
def test_truncated_shard(ckpt, which):
    path = ckpt("sharded")
    victim = shards(path)[which]
    f = path / victim
    data = f.read_bytes()
    f.write_bytes(data[:-37])
    expect(CheckpointError, lambda: load(path), victim, "truncated")


def test_truncated_single_file(ckpt):
    path = ckpt()
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1])
    expect(CheckpointError, lambda: load(path), "model.safetensors", "truncated")


def test_truncated_inside_header(ckpt):
    path = ckpt()
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    expect(CheckpointError, lambda: load(path), "model.safetensors")


def test_missing_shard_listed_in_index(ckpt):
    path = ckpt("sharded")
    victim = shards(path)[1]
    with open(path / "model.safetensors.index.json") as fh:
        held = [n for n, s in json.load(fh)["weight_map"].items() if s == victim]
    os.remove(path / victim)
    expect(CheckpointError, lambda: load(path), victim, "missing", held[0])


def test_index_not_json(ckpt):
    path = ckpt("sharded")
    (path / "model.safetensors.index.json").write_text("{ not json")
    expect(CheckpointError, lambda: load(path), "model.safetensors.index.json")


def test_index_without_weight_map(ckpt):
    path = ckpt("sharded")
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    expect(CheckpointError, lambda: load(path), "model.safetensors.index.json", "weight_map")


# ---------------------------------------------------------------------------------------------- values


def put_bf16(path, name, pos, bad):
    """Stores tensor `name` as bf16 (via safetensors.torch) with one non-finite value at `pos`."""
    f = str(path / "model.safetensors")
    tensors = torch_load_file(f)
    t = tensors[name].to(torch.bfloat16)
    t[pos] = bad
    tensors[name] = t
    torch_save_file(tensors, f, metadata={"format": "pt"})


@pytest.mark.parametrize("name,pos,bad,experts", [
    (L1 + "self_attn.o_proj.weight", (3, 17), float("nan"), "mxfp4"),
    ("model.layers.2.mlp.experts.gate_up_proj_bias", (4, 100), float("inf"), "dense"),
    ("model.embed_tokens.weight", (330, 95), float("-inf"), "mxfp4"),
])
def test_nonfinite_in_bf16_tensor(ckpt, name, pos, bad, experts):
    path = ckpt()
    put_bf16(path, name, pos, bad)
    expect(CheckpointError, lambda: load(path, experts=experts), name, str(pos), "NaN/Inf")


def test_nonfinite_check_can_be_turned_off(ckpt):
    path = ckpt()
    put_bf16(path, L1 + "mlp.router.weight", (2, 7), float("nan"))
    state = nnx.to_flat_state(nnx.state(load(path, check_finite=False)))
    leaves = [v.get_value() for _, v in state]
    leaves = [np.asarray(x, np.float32) for x in leaves if not isinstance(x, gptoss.MXFP4Array)]
    assert sum(int(np.sum(np.isnan(x))) for x in leaves) == 1  # the one bad value is really there


def test_nan_in_fp32_tensor(ckpt):
    path = ckpt()
    name = "model.layers.0.input_layernorm.weight"
    edit_tensors(path, lambda t: t[name].__setitem__(50, np.nan))
    expect(CheckpointError, lambda: load(path), name, "(50,)")


@pytest.mark.parametrize("which,experts", [("gate_up_proj_scales", "mxfp4"), ("down_proj_scales", "dense")])
def test_scale_byte_255(ckpt, which, experts):
    path = ckpt()
    name = "model.layers.2.mlp.experts." + which
    edit_tensors(path, lambda t: t[name].__setitem__((2, 5, 1), 255))
    expect(CheckpointError, lambda: load(path, experts=experts), name, "255")


# ---------------------------------------------------------------------------------------------- config


def test_config_missing_head_dim(ckpt):
    path = ckpt()
    edit_config(path, lambda c: c.pop("head_dim"))
    expect(ConfigError, lambda: load(path), "head_dim", "config.json")


@pytest.mark.parametrize("key", ["hidden_size", "num_local_experts", "vocab_size"])
def test_config_missing_required_key(ckpt, key):
    path = ckpt()
    edit_config(path, lambda c: c.pop(key))
    expect(ConfigError, lambda: load(path), key)


def test_config_not_json(ckpt):
    path = ckpt()
    (path / "config.json").write_text("{'hidden_size': 96")
    expect(CheckpointError, lambda: load(path), "config.json")


@pytest.mark.parametrize("key,value,name,found,expected", [
    ("hidden_size", 128, "model.embed_tokens.weight", [331, 96], [331, 128]),
    ("vocab_size", 300, "model.embed_tokens.weight", [331, 96], [300, 96]),
    ("num_local_experts", 4, "model.layers.0.mlp.router.weight", [5, 96], [4, 96]),
    ("num_attention_heads", 4, "model.layers.0.self_attn.q_proj.weight", [120, 96], [80, 96]),
    ("intermediate_size", 32, "model.layers.0.mlp.experts.gate_up_proj_bias", [5, 128], [5, 64]),
])
def test_config_contradicts_tensors(ckpt, key, value, name, found, expected):
    path = ckpt()
    edit_config(path, lambda c: c.__setitem__(key, value))
    expect(CheckpointError, lambda: load(path), name, str(found), str(expected))


def test_mxfp4_needs_hidden_multiple_of_32(tmp_path, random_model):
    cfg = ModelConfig.tiny(hidden_size=80)
    model = random_model(cfg, jnp.float32, "dense")
    expect(ConfigError, lambda: save_pretrained(model, tmp_path / "x", experts="mxfp4"), "hidden_size=80", "32")
    save_pretrained(model, tmp_path / "d", experts="dense")
    with pytest.warns(UserWarning, match="dense experts"):
        expect(ConfigError, lambda: load(tmp_path / "d", experts="mxfp4"), "hidden_size=80", "32")
    loaded = load(tmp_path / "d", experts="dense")  # dense is fine
    assert loaded.config.hidden_size == 80


def test_mxfp4_needs_intermediate_multiple_of_32():
    cfg = ModelConfig.tiny(intermediate_size=48)
    expect(ConfigError, lambda: nnx.eval_shape(lambda: gptoss.GptOss(cfg, experts="mxfp4")), "intermediate_size=48")


# ---------------------------------------------------------------------------------------------- paths


def test_not_a_checkpoint_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    expect(CheckpointError, lambda: load(tmp_path), str(tmp_path), "no gpt-oss checkpoint", "notes.txt")


def test_config_without_tensors(ckpt):
    path = ckpt()
    os.remove(path / "model.safetensors")
    expect(CheckpointError, lambda: load(path), str(path), "no gpt-oss checkpoint")


def test_a_file_instead_of_a_folder(ckpt):
    path = ckpt() / "model.safetensors"
    expect(CheckpointError, lambda: load(path), "model.safetensors", "not a folder")


def test_nonexistent_path(tmp_path):
    missing = tmp_path / "no" / "such" / "ckpt"
    expect(CheckpointError, lambda: load(missing), str(missing))
    expect(CheckpointError, lambda: load(str(missing)), str(missing))


def test_hub_id_offline(monkeypatch, tmp_path):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    calls = []

    def offline(repo_id, **kw):
        calls.append(repo_id)
        raise ConnectionError("network is unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.chdir(tmp_path)  # so "openai/gpt-oss-20b" is not a local folder by accident
    msg = expect(CheckpointError, lambda: load("openai/gpt-oss-20b"), "openai/gpt-oss-20b", "hub",
                 "network is unreachable")
    assert "local folder" in msg
    assert calls == ["openai/gpt-oss-20b"]


def test_hub_id_without_huggingface_hub(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # `import huggingface_hub` -> ImportError
    monkeypatch.chdir(tmp_path)
    expect(CheckpointError, lambda: load("openai/gpt-oss-20b"), "openai/gpt-oss-20b", "huggingface_hub",
           "local folder")


def test_bad_arguments(ckpt):
    path = ckpt()
    with pytest.raises(ValueError, match="experts"):
        load(path, experts="fp8")
    with pytest.raises(ValueError, match="layout"):
        load(path, checkpoint_layout="gguf")
