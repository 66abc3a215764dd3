"""Benchmarks are scripts, not tests; this only keeps the device check from rotting (reduced shapes, CPU)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_gpu_check_runs_in_reduced_mode():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu.py"), "--reduced"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = json.loads(proc.stdout.strip().splitlines()[-1])["written"]
    with open(written) as f:
        out = json.load(f)
    assert out["reduced"] and out["decode"]["tok_s"] > 0 and out["prefill"]["tok_s"] > 0
