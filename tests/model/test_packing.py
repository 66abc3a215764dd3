"""gptoss.pack_dense: a bf16 model with bf12 attention/unembedding weights against transformers' fp32 oracle
(prefill on the tiles, a decode-sized forward on the GEMV), greedy generation unchanged, which weights pack,
saving back the checkpoint's bits, and the refusals."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from parity_models import hf_forward, kl, sample_tokens
from safetensors.numpy import load_file

import gptoss
from gptoss.engine import generate
from gptoss.kernels import bf12_cpu
from gptoss.model import packing
from gptoss.quant import BF12Array, QuantWeight

pytestmark = pytest.mark.skipif(not bf12_cpu.kernel_available() or jax.default_backend() != "cpu",
                                reason="the CPU kernel library is unavailable")


def load(path, **kw):
    return gptoss.from_pretrained(path, dtype="bfloat16", experts="mxfp4", progress=False, **kw)


@pytest.fixture(scope="module")
def packed(bf16_mxfp4_ckpt):
    return gptoss.pack_dense(load(bf16_mxfp4_ckpt[0], kernels="cpu"), "bf12")


def _metrics(ours, ref):
    return float((ours.argmax(-1) == ref.argmax(-1)).mean()), float(kl(ref, ours).mean())


def test_which_weights_pack(packed):
    attn = packed.layers[0].attn
    for name in ("wq_NHD", "wk_KHD", "wv_KHD"):
        assert isinstance(getattr(attn, name), QuantWeight) and isinstance(getattr(attn, name)[...], BF12Array)
    assert isinstance(packed.unembed_VD[...], BF12Array)
    # o_proj contracts 6 heads x 20 = 120 (not whole 32-blocks): it stays a bf16 parameter
    assert isinstance(attn.wo_DNH, gptoss.quant.QuantWeight) is False and attn.wo_DNH[...].dtype == jnp.bfloat16
    assert packing.dense_format(packed) == "bf12"


@pytest.mark.parametrize("B,T", [(4, 32), (3, 1)], ids=["prefill", "decode_sized"])
def test_logits_vs_fp32_oracle(bf16_mxfp4_ckpt, packed, B, T):
    """The bf16 parity criteria of tests/model/test_parity.py, with the packed weights on the kernels."""
    tokens = sample_tokens(B, T, seed=4) if T > 1 else np.random.default_rng(4).integers(0, 331, (B, T), np.int32)
    ref = hf_forward(bf16_mxfp4_ckpt[1], tokens)
    ours = np.asarray(packed(jnp.asarray(tokens)))
    top1, mean_kl = _metrics(ours, ref)
    assert top1 >= (0.99 if B * T > 8 else 1.0) and mean_kl <= 1e-3, (top1, mean_kl)


def test_the_kernels_run_and_greedy_generation_is_unchanged(bf16_mxfp4_ckpt, packed, monkeypatch):
    calls = []
    real = bf12_cpu.matmul_many
    monkeypatch.setattr(bf12_cpu, "matmul_many", lambda x, ws: calls.append(x.shape[0]) or real(x, ws))
    rng = np.random.default_rng(8)
    prompts = [rng.integers(0, 331, n).tolist() for n in (9, 4, 12)]
    ours = generate(packed, prompts, max_new_tokens=12)
    assert 3 in calls  # decode steps: 3 rows of one token
    plain = generate(load(bf16_mxfp4_ckpt[0], kernels="cpu"), prompts, max_new_tokens=12)
    assert ours.tokens == plain.tokens


def test_save_writes_the_checkpoint_bits_back(bf16_mxfp4_ckpt, packed, tmp_path):
    gptoss.save_pretrained(packed, tmp_path)
    ours = load_file(tmp_path / "model.safetensors")
    theirs = {}
    for f in sorted(bf16_mxfp4_ckpt[0].glob("*.safetensors")):
        theirs.update(load_file(f))
    for name in ("lm_head.weight", "model.layers.1.self_attn.q_proj.weight", "model.layers.2.self_attn.v_proj.weight"):
        assert np.array_equal(ours[name].view(np.uint16), theirs[name].view(np.uint16)), name


def test_unpack_restores_parameters_and_auto_follows_the_cpu(bf16_mxfp4_ckpt):
    model = load(bf16_mxfp4_ckpt[0], kernels="cpu")
    before = np.asarray(model.unembed_VD[...]).view(np.uint16)
    gptoss.pack_dense(model, "auto")
    assert packing.dense_format(model) == ("bf12" if bf12_cpu.fast() and bf12_cpu.best_isa() != "amx" else "bf16")
    gptoss.unpack_dense(model)
    assert packing.dense_format(model) == "bf16" and isinstance(model.unembed_VD, gptoss.quant.QuantWeight) is False
    assert np.array_equal(np.asarray(model.unembed_VD[...]).view(np.uint16), before)
    model.kernels = "xla"
    assert packing.resolve_dense_format("auto", model) == "bf16"  # the XLA path has no bf12 kernel to pay for it


@pytest.mark.parametrize("best, fast, expected", [("avx512", True, "bf12"), ("amx", True, "bf16"),
                                                  ("scalar", False, "bf16")])
def test_auto_packs_where_measured_to_pay(bf16_mxfp4_ckpt, monkeypatch, best, fast, expected):
    """auto: bf12 on AVX-512 VBMI + BF16 CPUs without AMX (Zen 4); AMX CPUs and the scalar reference keep bf16."""
    model = load(bf16_mxfp4_ckpt[0], kernels="cpu")
    monkeypatch.setattr(bf12_cpu, "best_isa", lambda: best)
    monkeypatch.setattr(bf12_cpu, "fast", lambda: fast)
    assert packing.resolve_dense_format("auto", model) == expected
    assert packing.resolve_dense_format("bf12", model) == "bf12"  # asked for, it packs anywhere


def test_many_exceptions_keep_bf16_and_refusals(bf16_mxfp4_ckpt, monkeypatch):
    monkeypatch.setattr(packing, "MAX_EXCEPTION_SHARE", 0.0)
    model = gptoss.pack_dense(load(bf16_mxfp4_ckpt[0], kernels="cpu"), "bf12")
    kept = [isinstance(getattr(m, a)[...], BF12Array) for m, a, _ in packing._targets(model)]
    assert not all(kept)  # weights with any exception stayed bf16
    fp32 = gptoss.from_pretrained(bf16_mxfp4_ckpt[0], dtype="float32", progress=False)
    with pytest.raises(ValueError, match="bfloat16"):
        gptoss.pack_dense(fp32, "bf12")
    assert packing.resolve_dense_format("auto", fp32) == "bf16"
    with pytest.raises(ValueError, match="dense weights"):
        gptoss.pack_dense(fp32, "bf8")


def test_full_fine_tuning_refuses_packed_weights(packed):
    from gptoss.train import Trainer
    from gptoss.train.step import OptimConfig

    with pytest.raises(ValueError, match="unpack_dense"):
        Trainer(packed, "full", OptimConfig(learning_rate=1e-3))
