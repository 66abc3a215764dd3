"""Benchmarks are scripts, not tests; this only keeps the device check from rotting (reduced shapes, CPU)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_gpu_check_runs_in_reduced_mode():
    # one layer, batch 1 (its compile serves TTFT too), one prefill length: every row, both sides, two compiles
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "gpu.py"), "--reduced", "--layers", "1", "--batches", "1",
           "--prefill", "64", "--runs", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = json.loads(proc.stdout.strip().splitlines()[-1])["written"]
    with open(written) as f:
        out = json.load(f)
    assert out["reduced"] and out["bandwidth_Bps"] > 0 and out["gptoss"]["kernels"]["requested"] == "auto"
    have_hf = all(importlib.util.find_spec(m) for m in ("torch", "transformers"))
    sides = ["gptoss", "transformers"] if have_hf else ["gptoss"]
    for side in sides:
        rows = out[side]
        assert "error" not in rows, rows.get("error")
        d = rows["decode"]["1"]
        assert d["tok_s"] > 0 and d["step_s"] > 0 and d["roofline"] > 0, d
        assert rows["ttft"]["16"]["s"] > 0 and rows["prefill"]["64"]["tok_s"] > 0
    for key in ("decode_1", "ttft_16", "prefill_64"):
        assert len(sides) == 1 or out["ratios"][key] > 0
