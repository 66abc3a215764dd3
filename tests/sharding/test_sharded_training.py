"""Training on 8 virtual CPU devices: gradients through the sharded MoE against one device and torch autograd, and
the expert-parallel FLOP saving. One subprocess (tests/sharding/sharded_checks.py, part "training")."""

from __future__ import annotations

import math

import pytest
from test_sharded import run_checks

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return run_checks(tmp_path_factory, "training")


@pytest.mark.parametrize("experts", ["mxfp4", "dense"])
def test_gradients_match_one_device_and_torch(report, experts):
    """jax.grad of the token NLL through the sharded MoE (meshes 2x2x2 and 1x8x1, each strategy) equals the
    single-device gradient within 1e-5 and torch autograd through transformers within 1e-4, per parameter."""
    rows = report["grads"][experts]
    assert rows["single/vs_torch"] <= 1e-4 and len(rows) >= 2
    for case, r in rows.items():
        if case in ("single/vs_torch", "seconds"):
            continue
        assert r["vs_single"] <= 1e-5, f"{experts} {case}: {r['worst_vs_single']} differs by {r['vs_single']:.1e}"
        assert r["vs_torch"] <= 1e-4, f"{experts} {case}: {r['vs_torch']:.1e} from torch autograd"
        assert r["expert_grads"] == (experts == "dense"), f"{experts} {case}: expert weight gradients"


def test_expert_parallel_flops_are_an_eighth(report):
    """With expert=8 each device computes only the pairs routed to its own experts: per-device MoE FLOPs (XLA's
    cost analysis of the compiled layer) are about 1/8 of one device's."""
    for impl, r in report["ep_flops"].items():
        assert r["ratio"] <= 0.16, f"{impl}: per-device MoE FLOPs are {r['ratio']:.3f} of one device's"


@pytest.mark.parametrize("method", ["lora"])
def test_train_steps_match_one_device(report, method):
    """Five optimizer steps on the mesh data 2 x fsdp 2 x expert 2 give the same losses as one device (1e-5), from
    one compile: the state `init` returns is placed as the step returns it."""
    assert report["train_steps"][f"{method}_compiles"] == 1
    r = report["train_steps"][method]
    assert len(r["single"]) == len(r["2x2x2"]) == 5
    assert r["max_rel"] <= 1e-5, r


def test_fsdp_stores_parameters_split(report):
    """On data 2 x fsdp 2 x expert 2, parameters, packed experts, adapters and their optimizer state are stored
    split over fsdp (each device holds half of what the expert axis leaves it), not replicated."""
    specs = report["train_steps"]["lora_specs"]
    for kind in ("unembed_VD", "gate_up_EFD", "wq_NHD", "q_a_DR"):
        mine = {k: v for k, v in specs.items() if kind in k}
        assert mine and all("fsdp" in v for v in mine.values()), (kind, mine)
    assert any("'opt'" in k and "q_a_DR" in k for k in specs), sorted(specs)
    assert all("'expert'" in v for k, v in specs.items() if "gate_up_EFD" in k), specs


def test_adapter_dropout_trains_on_the_mesh(report):
    """LoRA dropout on data 2 x fsdp 2 x expert 2 (masks drawn per shard inside the sharded MoE) runs and learns."""
    losses = report["train_steps"]["lora_dropout"]
    assert len(losses) == 3 and all(map(math.isfinite, losses)) and losses[-1] < losses[0], losses
