"""save_pretrained / from_pretrained round trips, checked against the `safetensors` library's view of the files,
the transformers tensor layout written out by hand, and the numpy MXFP4 reference (`unpack_ref`)."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file as np_load_file
from safetensors.torch import load_file as torch_load_file
from safetensors.torch import save_file as torch_save_file

from gptoss import ModelConfig, MXFP4Array, from_pretrained, save_pretrained
from gptoss.io import CheckpointError, open_checkpoint
from gptoss.quant import unpack_ref

CFG = ModelConfig.tiny()
D, N, K, H = CFG.hidden_size, CFG.num_attention_heads, CFG.num_key_value_heads, CFG.head_dim
E, I, V, LAYERS = CFG.num_experts, CFG.intermediate_size, CFG.vocab_size, CFG.num_hidden_layers
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
SMALL_SHARD = 50_000


def load(path, **kw):
    return from_pretrained(path, progress=False, **kw)


def flat(model):
    return {path: var.get_value() for path, var in nnx.to_flat_state(nnx.state(model))}


def assert_same_params(a, b):
    """Bit-identical state leaves (packed experts compared byte for byte)."""
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys()
    for path, x in fa.items():
        y = fb[path]
        if isinstance(x, MXFP4Array):
            assert isinstance(y, MXFP4Array), path
            assert x.dtype == y.dtype, path
            np.testing.assert_array_equal(np.asarray(x.blocks), np.asarray(y.blocks), err_msg=str(path))
            np.testing.assert_array_equal(np.asarray(x.scales), np.asarray(y.scales), err_msg=str(path))
        else:
            assert not isinstance(y, MXFP4Array), path
            x, y = np.asarray(x), np.asarray(y)
            assert x.dtype == y.dtype and x.shape == y.shape, (path, x.dtype, y.dtype, x.shape, y.shape)
            assert x.tobytes() == y.tobytes(), path


def shard_files(path):
    return sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))


def all_tensors(path):
    """Every tensor of a saved folder, via safetensors.torch (bf16 included)."""
    out = {}
    for f in shard_files(path):
        out.update(torch_load_file(os.path.join(path, f)))
    return out


def np32(t: torch.Tensor) -> np.ndarray:
    return t.float().numpy() if t.is_floating_point() else t.numpy()


def expected_names(packed: bool) -> set[str]:
    """The transformers gpt-oss tensor names, written out independently of gptoss.io.keymap."""
    names = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for L in range(LAYERS):
        p = f"model.layers.{L}."
        names |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight", p + "self_attn.sinks",
                  p + "mlp.router.weight", p + "mlp.router.bias", p + "mlp.experts.gate_up_proj_bias",
                  p + "mlp.experts.down_proj_bias"}
        names |= {p + f"self_attn.{x}_proj.{w}" for x in "qkvo" for w in ("weight", "bias")}
        if packed:
            names |= {p + f"mlp.experts.{m}_proj_{s}" for m in ("gate_up", "down") for s in ("blocks", "scales")}
        else:
            names |= {p + "mlp.experts.gate_up_proj", p + "mlp.experts.down_proj"}
    return names


def assert_mxfp4_close(dense, blocks, scales):
    """`unpack_ref(blocks, scales)` is an OCP-MX quantization of `dense` [..., N, K]: per block of 32 the shared
    scale is 2**(floor(log2 amax) - 2), and each value is the nearest E2M1 grid point (saturating at 6)."""
    dense = np.asarray(dense, np.float32)
    got = unpack_ref(np.asarray(blocks), np.asarray(scales))
    assert got.shape == dense.shape
    xb = dense.reshape(*dense.shape[:-1], -1, 32)
    amax = np.abs(xb).max(-1)
    want_scale = np.where(amax > 0, np.floor(np.log2(np.where(amax > 0, amax, 1))) - 2 + 127, 0)
    np.testing.assert_array_equal(np.asarray(scales).astype(np.int64), want_scale.astype(np.int64))
    s = np.ldexp(1.0, np.asarray(scales).astype(np.int32) - 127)[..., None]
    a = np.abs(xb) / s  # in [0, 8)
    half_step = np.where(a < 2, 0.25, np.where(a < 4, 0.5, 1.0))
    err = np.abs(got.reshape(xb.shape) - xb) / s
    inside = a <= 6
    assert np.all(err[inside] <= half_step[inside] + 1e-6)
    np.testing.assert_array_equal(got.reshape(xb.shape)[~inside], np.sign(xb[~inside]) * 6 * np.broadcast_to(
        s, xb.shape)[~inside])
    rel = np.linalg.norm(got - dense) / np.linalg.norm(dense)
    assert rel < 0.2


# ---------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("sharded", [False, True], ids=["one-file", "sharded"])
@pytest.mark.parametrize("experts", ["mxfp4", "dense"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_bit_identical(tmp_path, random_model, dtype, experts, sharded):
    model = random_model(CFG, DTYPES[dtype], experts, seed=7)
    path = tmp_path / "ckpt"
    kw = {"max_shard_bytes": SMALL_SHARD} if sharded else {}
    assert save_pretrained(model, path, experts=experts, **kw) == str(path)
    loaded = load(path, dtype=dtype, experts=experts)
    assert loaded.config == CFG
    assert loaded.dtype == jnp.dtype(dtype)
    assert_same_params(model, loaded)

    files = shard_files(path)
    tensors = all_tensors(path)
    assert set(tensors) == expected_names(experts == "mxfp4")
    with open(path / "config.json") as fh:
        config = json.load(fh)
    assert config["model_type"] == "gpt_oss" and config["torch_dtype"] == dtype
    assert ("quantization_config" in config) == (experts == "mxfp4")
    if experts == "mxfp4":
        assert config["quantization_config"]["quant_method"] == "mxfp4"
        assert all(tensors[n].dtype == torch.uint8 for n in tensors if n.endswith(("_blocks", "_scales")))
    want_torch = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    assert tensors["model.layers.0.self_attn.q_proj.weight"].dtype == want_torch
    assert tensors["model.norm.weight"].dtype == torch.float32  # norm gains stay fp32
    if not sharded:
        assert sorted(os.listdir(path)) == ["config.json", "model.safetensors"]
        return

    # sharded: transformers-style names, an index covering every tensor, the right total size
    n = len(files)
    assert n > 2
    assert files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(os.listdir(path)) == sorted(files + ["config.json", "model.safetensors.index.json"])
    with open(path / "model.safetensors.index.json") as fh:
        index = json.load(fh)
    weight_map = index["weight_map"]
    assert set(weight_map) == set(tensors)
    assert set(weight_map.values()) == set(files)
    total = 0
    for f in files:
        with safe_open(str(path / f), framework="pt") as fh:
            keys = set(fh.keys())
            assert fh.metadata() == {"format": "pt"}
        assert keys == {k for k, v in weight_map.items() if v == f}
        nbytes = [tensors[k].numel() * tensors[k].element_size() for k in keys]
        assert sum(nbytes) <= SMALL_SHARD or len(keys) == 1, f
        total += sum(nbytes)
    assert index["metadata"]["total_size"] == total == sum(t.numel() * t.element_size() for t in tensors.values())


@pytest.mark.parametrize("experts", ["mxfp4", "dense"])
def test_saved_tensors_follow_the_transformers_layout(tmp_path, random_model, experts):
    """Checkpoint [out, in] matrices and transformers' dense experts [E, in, out], written out by hand."""
    model = random_model(CFG, jnp.float32, "mxfp4", seed=3)
    save_pretrained(model, tmp_path, experts=experts)
    t = {k: np32(v) for k, v in torch_load_file(str(tmp_path / "model.safetensors")).items()}
    p = flat(model)
    for L in range(LAYERS):
        a, m, pre = ("layers", L, "attn"), ("layers", L, "mlp"), f"model.layers.{L}."
        wq, wk, wo = (np.asarray(p[a + (n,)]) for n in ("wq_NHD", "wk_KHD", "wo_DNH"))
        q, k, o = (t[pre + f"self_attn.{x}_proj.weight"] for x in "qko")
        for n in range(N):
            for h in (0, H - 1):
                np.testing.assert_array_equal(q[n * H + h, :], wq[n, h, :])
                np.testing.assert_array_equal(o[:, n * H + h], wo[:, n, h])
        np.testing.assert_array_equal(k[K * H - 1, :], wk[K - 1, H - 1, :])
        np.testing.assert_array_equal(t[pre + "self_attn.q_proj.bias"], np.asarray(p[a + ("bq_NH",)]).ravel())
        np.testing.assert_array_equal(t[pre + "mlp.router.weight"], np.asarray(p[m + ("router_ED",)]))
        gate_up, down = p[m + ("gate_up_EFD",)], p[m + ("down_EDI",)]
        gu_ref = unpack_ref(np.asarray(gate_up.blocks), np.asarray(gate_up.scales))  # [E, 2I, D]
        dn_ref = unpack_ref(np.asarray(down.blocks), np.asarray(down.scales))        # [E, D, I]
        x = pre + "mlp.experts."
        if experts == "mxfp4":
            np.testing.assert_array_equal(t[x + "gate_up_proj_blocks"], np.asarray(gate_up.blocks))
            np.testing.assert_array_equal(t[x + "down_proj_scales"], np.asarray(down.scales))
        else:
            assert t[x + "gate_up_proj"].shape == (E, D, 2 * I) and t[x + "down_proj"].shape == (E, I, D)
            np.testing.assert_array_equal(t[x + "gate_up_proj"], gu_ref.transpose(0, 2, 1))
            np.testing.assert_array_equal(t[x + "down_proj"], dn_ref.transpose(0, 2, 1))
    np.testing.assert_array_equal(t["model.embed_tokens.weight"], np.asarray(p[("embed_VD",)]))
    np.testing.assert_array_equal(t["lm_head.weight"], np.asarray(p[("unembed_VD",)]))


# ---------------------------------------------------------------------------------------------- the folder


def test_resave_with_fewer_shards_leaves_no_stale_files(tmp_path, random_model):
    path = tmp_path / "ckpt"
    path.mkdir()
    user_files = {"notes.txt": "my notes\n", "README.md": "# my model\n", "tokenizer.json": "{}",
                  "model-card.md": "card", "generation_config.json": '{"do_sample": true}'}
    for name, text in user_files.items():
        (path / name).write_text(text)
    (path / "original").mkdir()
    (path / "original" / "keep.txt").write_text("x")

    first = random_model(CFG, jnp.float32, "dense", seed=1)
    save_pretrained(first, path, experts="dense", max_shard_bytes=SMALL_SHARD)
    many = shard_files(path)
    assert len(many) > 4

    second = random_model(CFG, jnp.float32, "dense", seed=2)
    save_pretrained(second, path, experts="dense", max_shard_bytes=4 * SMALL_SHARD)
    fewer = shard_files(path)
    assert 1 < len(fewer) < len(many)
    n = len(fewer)
    assert fewer == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(os.listdir(path)) == sorted(fewer + ["config.json", "model.safetensors.index.json", "original",
                                                       *user_files])
    with open(path / "model.safetensors.index.json") as fh:
        assert set(json.load(fh)["weight_map"].values()) == set(fewer)
    assert_same_params(second, load(path, dtype="float32", experts="dense"))

    third = random_model(CFG, jnp.float32, "mxfp4", seed=3)
    save_pretrained(third, path, experts="mxfp4")  # one file: index and every numbered shard go
    assert sorted(os.listdir(path)) == sorted(["config.json", "model.safetensors", "original", *user_files])
    assert_same_params(third, load(path, dtype="float32"))

    save_pretrained(first, path, experts="dense", max_shard_bytes=SMALL_SHARD)  # and back: model.safetensors goes
    assert "model.safetensors" not in os.listdir(path)
    assert_same_params(first, load(path, dtype="float32", experts="dense"))

    for name, text in user_files.items():
        assert (path / name).read_text() == text
    assert (path / "original" / "keep.txt").read_text() == "x"
    assert not [f for f in os.listdir(path) if f.startswith(".")]  # no staging folder left behind


# ---------------------------------------------------------------------------------------------- experts conversions


def test_save_dense_model_as_mxfp4(tmp_path, random_model):
    model = random_model(CFG, jnp.float32, "dense", seed=4)
    save_pretrained(model, tmp_path, experts="mxfp4")
    t = np_load_file(str(tmp_path / "model.safetensors"))
    p = flat(model)
    for L in range(LAYERS):
        x, m = f"model.layers.{L}.mlp.experts.", ("layers", L, "mlp")
        assert t[x + "gate_up_proj_blocks"].dtype == np.uint8
        assert t[x + "gate_up_proj_blocks"].shape == (E, 2 * I, D // 32, 16)
        assert t[x + "down_proj_scales"].shape == (E, D, I // 32)
        assert_mxfp4_close(p[m + ("gate_up_EFD",)], t[x + "gate_up_proj_blocks"], t[x + "gate_up_proj_scales"])
        assert_mxfp4_close(p[m + ("down_EDI",)], t[x + "down_proj_blocks"], t[x + "down_proj_scales"])
    with open(tmp_path / "config.json") as fh:
        assert json.load(fh)["quantization_config"]["quant_method"] == "mxfp4"


def test_load_dense_checkpoint_as_mxfp4_warns_and_quantizes(tmp_path, random_model):
    model = random_model(CFG, jnp.float32, "dense", seed=5)
    save_pretrained(model, tmp_path, experts="dense")
    t = np_load_file(str(tmp_path / "model.safetensors"))
    with pytest.warns(UserWarning, match="dense experts"):
        loaded = load(tmp_path, dtype="float32", experts="mxfp4")
    p, q = flat(model), flat(loaded)
    for path, value in q.items():
        if path[-1] in ("gate_up_EFD", "down_EDI"):
            assert isinstance(value, MXFP4Array) and value.dtype == jnp.float32
            x = f"model.layers.{path[1]}.mlp.experts." + ("gate_up_proj" if path[-1] == "gate_up_EFD" else "down_proj")
            assert_mxfp4_close(t[x].swapaxes(-1, -2), value.blocks, value.scales)  # file is [E, in, out]
        else:
            assert np.asarray(value).tobytes() == np.asarray(p[path]).tobytes(), path


def test_experts_auto_keeps_the_checkpoint_format(tmp_path, random_model, recwarn):
    """The default experts="auto": a dense checkpoint loads dense and bit-exact (no quantization, no warning),
    a packed one stays packed."""
    dense = random_model(CFG, jnp.float32, "dense", seed=8)
    save_pretrained(dense, tmp_path / "dense", experts="dense")
    loaded = load(tmp_path / "dense", dtype="float32")
    assert loaded.experts == "dense" and not [w for w in recwarn if "quantiz" in str(w.message)]
    for path, value in flat(loaded).items():
        assert np.asarray(value).tobytes() == np.asarray(flat(dense)[path]).tobytes(), path
    save_pretrained(dense, tmp_path / "packed", experts="mxfp4")
    assert load(tmp_path / "packed", dtype="float32").experts == "mxfp4"


def test_generation_config_adds_stop_ids(tmp_path, random_model):
    """generation_config.json's eos_token_id joins config.json's as default stop ids (the hub's gpt-oss lists
    <|return|>, <|endoftext|>, <|call|> there); an id outside the vocabulary is an error naming the file."""
    save_pretrained(random_model(CFG, jnp.float32, "mxfp4", seed=9), tmp_path)
    eos = CFG.stop_token_ids
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos[0], 5, 7]}))
    assert load(tmp_path, dtype="float32").config.stop_token_ids == (*eos, 5, 7)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": CFG.vocab_size}))
    with pytest.raises(CheckpointError, match="generation_config.json"):
        load(tmp_path, dtype="float32")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_load_mxfp4_checkpoint_as_dense_dequantizes_exactly(tmp_path, random_model, dtype):
    model = random_model(CFG, DTYPES[dtype], "mxfp4", seed=6)
    save_pretrained(model, tmp_path, experts="mxfp4", max_shard_bytes=SMALL_SHARD)
    t = {}
    for f in shard_files(tmp_path):
        t.update({k: v for k, v in np_load_file(str(tmp_path / f)).items() if v.dtype == np.uint8})
    loaded = load(tmp_path, dtype=dtype, experts="dense")
    q = flat(loaded)
    for L in range(LAYERS):
        x, m = f"model.layers.{L}.mlp.experts.", ("layers", L, "mlp")
        for ours, theirs in (("gate_up_EFD", "gate_up_proj"), ("down_EDI", "down_proj")):
            got = np.asarray(q[m + (ours,)])
            assert not isinstance(q[m + (ours,)], MXFP4Array) and got.dtype == jnp.dtype(dtype)
            want = unpack_ref(t[x + theirs + "_blocks"], t[x + theirs + "_scales"])
            np.testing.assert_array_equal(got.astype(np.float32), want)
    # everything else is bit-identical to the saved model
    for path, value in flat(model).items():
        if path[-1] not in ("gate_up_EFD", "down_EDI"):
            assert np.asarray(value).tobytes() == np.asarray(q[path]).tobytes(), path


# ---------------------------------------------------------------------------------------------- original/ layout


def to_original(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers names -> OpenAI `original/` names: fused qkv rows [q | k | v], experts as mlp1/mlp2."""
    out = {"embedding.weight": hf["model.embed_tokens.weight"], "norm.scale": hf["model.norm.weight"],
           "unembedding.weight": hf["lm_head.weight"]}
    for L in range(LAYERS):
        p, b, a, x = f"model.layers.{L}.", f"block.{L}.", f"model.layers.{L}.self_attn.", f"model.layers.{L}.mlp."
        out[b + "attn.norm.scale"] = hf[p + "input_layernorm.weight"]
        for w in ("weight", "bias"):
            out[b + f"attn.qkv.{w}"] = torch.cat([hf[a + f"{n}_proj.{w}"] for n in "qkv"], dim=0).contiguous()
            out[b + f"attn.out.{w}"] = hf[a + f"o_proj.{w}"]
        out[b + "attn.sinks"] = hf[a + "sinks"]
        out[b + "mlp.norm.scale"] = hf[p + "post_attention_layernorm.weight"]
        out[b + "mlp.gate.weight"] = hf[x + "router.weight"]
        out[b + "mlp.gate.bias"] = hf[x + "router.bias"]
        for new, old in (("mlp1", "gate_up_proj"), ("mlp2", "down_proj")):
            out[b + f"mlp.{new}_weight.blocks"] = hf[x + f"experts.{old}_blocks"]
            out[b + f"mlp.{new}_weight.scales"] = hf[x + f"experts.{old}_scales"]
            out[b + f"mlp.{new}_bias"] = hf[x + f"experts.{old}_bias"]
    return out


def write_original(hf_dir, folder, num_shards=2):
    """`folder/{config.json, model--0000k-of-0000n.safetensors}` (the 120b repo's naming, no index)."""
    os.makedirs(folder, exist_ok=True)
    tensors = to_original(all_tensors(hf_dir))
    names = sorted(tensors)
    for i in range(num_shards):
        part = {n: tensors[n] for n in names[i::num_shards]}
        torch_save_file(part, os.path.join(folder, f"model--{i + 1:05d}-of-{num_shards:05d}.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as fh:
        json.dump(CFG.to_original(), fh)


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def hf_and_original(request, tmp_path_factory, random_model):
    dtype = request.param
    root = tmp_path_factory.mktemp(f"orig_{dtype}")
    save_pretrained(random_model(CFG, DTYPES[dtype], "mxfp4", seed=11), root / "hf", experts="mxfp4")
    write_original(root / "hf", root / "snapshot" / "original")
    return dtype, root


def test_original_layout_files_are_what_we_think(hf_and_original):
    """The hand-made original/ folder holds exactly the names the reference checkpoints use."""
    dtype, root = hf_and_original
    folder = root / "snapshot" / "original"
    names = set()
    for f in shard_files(folder):
        with safe_open(str(folder / f), framework="pt") as fh:
            names |= set(fh.keys())
    assert len(names) == 3 + 15 * LAYERS
    assert {"block.2.attn.qkv.weight", "block.0.mlp.mlp1_weight.blocks", "block.1.mlp.mlp2_weight.scales",
            "block.0.mlp.gate.bias", "unembedding.weight"} <= names
    tensors = all_tensors(folder)
    qkv = tensors["block.1.attn.qkv.weight"]
    assert tuple(qkv.shape) == ((N + 2 * K) * H, D)
    assert qkv.dtype == {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    assert tensors["block.1.mlp.mlp1_weight.blocks"].dtype == torch.uint8


def test_original_layout_loads_like_hf(hf_and_original):
    dtype, root = hf_and_original
    want = load(root / "hf", dtype=dtype)
    from_root = load(root / "snapshot", dtype=dtype)        # root holds only original/
    from_folder = load(root / "snapshot" / "original", dtype=dtype)
    assert_same_params(want, from_root)
    assert_same_params(want, from_folder)
    for m in (from_root, from_folder):
        c = m.config
        assert (c.hidden_size, c.num_hidden_layers, c.layer_types, c.head_dim) == \
            (CFG.hidden_size, CFG.num_hidden_layers, CFG.layer_types, CFG.head_dim)
        assert (c.rope_scaling_factor, c.initial_context_length, c.rope_theta) == \
            (CFG.rope_scaling_factor, CFG.initial_context_length, CFG.rope_theta)
    dense = load(root / "snapshot", dtype=dtype, experts="dense")
    assert_same_params(load(root / "hf", dtype=dtype, experts="dense"), dense)
    kind, _, _, where = open_checkpoint(str(root / "snapshot"))
    assert kind == "original" and where == str(root / "snapshot" / "original")
    with pytest.raises(CheckpointError, match="layout='hf'"):
        load(root / "snapshot", dtype=dtype, checkpoint_layout="hf")


def test_layout_original_forces_it(hf_and_original, tmp_path, random_model):
    """A folder with HF files of one model and original/ of another: auto and "hf" pick the HF files,
    checkpoint_layout="original" the original/ ones."""
    dtype, root = hf_and_original
    other = random_model(CFG, DTYPES[dtype], "mxfp4", seed=12)
    both = tmp_path / "both"
    save_pretrained(other, both, experts="mxfp4")
    write_original(root / "hf", both / "original")
    assert_same_params(other, load(both, dtype=dtype))
    assert_same_params(other, load(both, dtype=dtype, checkpoint_layout="hf"))
    assert_same_params(load(root / "hf", dtype=dtype), load(both, dtype=dtype, checkpoint_layout="original"))
    assert open_checkpoint(str(both), "original")[0] == "original"
