"""Sharded inference on 8 virtual CPU devices vs one device: logits, greedy tokens, layouts, per-device bytes.

XLA_FLAGS must be set before JAX starts, and other test modules start JAX in this process first, so all of
it runs in ONE subprocess (tests/sharding/sharded_checks.py, ~1 min on 2 cores) whose JSON report the
tests below read.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
ATOL = 1e-5
MAIN_MESHES = ["8x1x1", "1x8x1", "2x4x1", "2x2x2", "1x1x8"]
ALL_MESHES = MAIN_MESHES + ["2x2x2-xla", "megatron-1x1x2", "fsdp2-expert4"]

pytestmark = pytest.mark.slow


def run_checks(tmp_path_factory, part: str) -> dict:
    out = tmp_path_factory.mktemp("sharded") / f"{part}.json"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = os.environ.get("GPTOSS_TEST_XLA_FLAGS", "")  # not this process's device count
    proc = subprocess.run([sys.executable, os.path.join(HERE, "sharded_checks.py"), str(out), part], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"sharded_checks.py {part} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    with open(out) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return run_checks(tmp_path_factory, "inference")


def test_eight_devices(report):
    assert report["devices"] == 8
    assert set(ALL_MESHES) <= set(report["meshes"])


@pytest.mark.parametrize("mesh", ALL_MESHES)
def test_logits_match_single_device(report, mesh):
    r = report["meshes"][mesh]
    for impl, err in r["logits_max_abs_err"].items():
        assert err <= ATOL, f"{mesh} moe_impl={impl}: fp32 logits differ by {err:.2e} (scale "
        f"{report['ref']['logits_scale']:.2f}) from the single-device model"


@pytest.mark.parametrize("mesh", [m for m in ALL_MESHES if m not in ("megatron-1x1x2", "fsdp2-expert4", "2x2x2-xla")])
def test_greedy_tokens_match_single_device(report, mesh):
    r = report["meshes"][mesh]
    assert report["ref"]["batch"] > 1
    assert r["tokens"] == report["ref"]["tokens"], f"{mesh}: greedy tokens differ"


@pytest.mark.parametrize("mesh", ALL_MESHES)
def test_each_device_holds_only_its_share_of_the_experts(report, mesh):
    e = report["meshes"][mesh]["expert_bytes"]
    assert e["devices"] == (2 if mesh == "megatron-1x1x2" else 8)
    assert e["per_device"] == [e["expected_per_device"]] * e["devices"], (mesh, e)


def test_layouts(report):
    m = report["meshes"]
    # experts on "expert"; expert rows on "tensor"; never the 16-byte block axis
    assert m["1x8x1"]["gate_up_spec"] == m["1x8x1"]["down_spec"] == "P('expert',)"
    assert m["2x2x2"]["gate_up_spec"] == m["2x2x2"]["down_spec"] == "P('expert', 'tensor')"
    assert m["1x1x8"]["gate_up_spec"] == m["1x1x8"]["down_spec"] == "P(None, 'tensor')"
    assert m["megatron-1x1x2"]["down_spec"] == "P(None, None, 'tensor')"  # the K/32 block axis
    assert m["8x1x1"]["gate_up_spec"] == "P()"
    # heads on tensor; kv heads too where they divide (4 on 2), replicated where not (4 on 8)
    assert m["2x2x2"]["wq_spec"] == m["2x2x2"]["wk_spec"] == "P('tensor',)"
    assert (m["1x1x8"]["wq_spec"], m["1x1x8"]["wk_spec"]) == ("P('tensor',)", "P()")
    assert any("num_key_value_heads=4" in n for n in m["1x1x8"]["notes"])


def test_kv_cache_layout(report):
    m = report["meshes"]
    # 8 rows split over data x fsdp x expert (attention is data-parallel over the expert axis too); kv heads
    # 4 on tensor 2, replicated on tensor 8. (2x2x2 reads the cache the engine's own prefill returns.)
    assert m["2x2x2"]["cache_spec_full"] == m["2x2x2"]["cache_spec_ring"] == "P(('data', 'expert'), None, 'tensor')"
    assert m["2x4x1"]["cache_spec_full"] == m["2x4x1"]["cache_spec_ring"] == "P(('data', 'expert'),)"
    assert m["1x8x1"]["cache_spec_full"] == "P('expert',)"
    assert m["8x1x1"]["cache_spec_full"] == "P('data',)"
    assert m["fsdp2-expert4"]["cache_spec_full"] == "P(('fsdp', 'expert'),)"
    assert m["1x1x8"]["cache_spec_full"] == "P()"


@pytest.mark.parametrize("mesh", ALL_MESHES)
def test_planner_matches_real_allocations(report, mesh):
    p = report["meshes"][mesh]["planner"]
    assert len(p["weights_real"]) == 1  # every device holds the same bytes
    assert abs(p["weights_planned"] - p["weights_real"][0]) <= 0.05 * p["weights_real"][0]
    assert abs(p["cache_planned"] - p["cache_real_device0"]) <= 0.05 * p["cache_real_device0"]


def test_bad_meshes_name_the_dimension_and_axis(report):
    e = report["errors"]
    assert "num_experts=12" in e["experts"] and "'expert' (size 8)" in e["experts"]
    assert "num_attention_heads=12" in e["heads"] and "'tensor' (size 8)" in e["heads"]
    assert "intermediate_size/32 = 2 MXFP4 blocks" in e["megatron"] and "'tensor' (size 8)" in e["megatron"]


def test_tiny_8dev_config_runs(report):
    r = report["config_run"]
    assert r["mesh"] == {"data": 4, "expert": 1, "tensor": 2}
    assert r["tokens"] == r["tokens_single_device"] and all(len(t) > 0 for t in r["tokens"])

