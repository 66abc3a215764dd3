"""Benchmarks are scripts, not tests; this keeps the device check from rotting (reduced shapes, CPU) and checks the
logic behind figures they report (the paired decode rounds' roofline shares)."""

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
        assert "error" not in d, d  # e.g. timing noise the retries did not get past
        assert d["tok_s"] > 0 and d["step_s"] > 0 and d["roofline"] > 0, d
        assert rows["ttft"]["16"]["s"] > 0 and rows["prefill"]["64"]["tok_s"] > 0
    for key in ("decode_1", "ttft_16", "prefill_64"):
        assert len(sides) == 1 or out["ratios"][key] > 0


def test_bf12_gemv_runs_reduced():
    from gptoss.kernels import bf12_cpu

    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "bf12_gemv.py"), "--rounds", "2", "--layers", "1",
           "--vocab", "320", "--tokens", "1,3", "--prefill", "6"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if not bf12_cpu.fast():
        assert "bf12_gemv skipped" in proc.stdout
        pytest.skip("bf12 is not fast on this CPU: the script says so and stops")
    with open(os.path.join(ROOT, "benchmarks", "results", "bf12_gemv.json")) as f:
        out = json.load(f)
    for key in ("unembedding_1", "attention_1", "unembedding_3", "attention_3", "unembedding_6", "attention_6"):
        assert out[key]["speedup_median"] > 0 and out[key]["bytes"]["bf12"] < out[key]["bytes"]["bf16"], key


@pytest.mark.skipif(not (sys.platform == "linux" and os.uname().machine == "x86_64"), reason="x86-64 Linux only")
def test_no_amx_refuses_only_the_tile_permission():
    """`--no-amx` (deny_amx): the seccomp filter answers arch_prctl(ARCH_REQ_XCOMP_PERM) with EPERM in the process and
    its children, and lets every other call through (a wrong jump in the filter refuses everything)."""
    code = """
import ctypes, os, subprocess, sys
sys.path.insert(0, os.path.join(sys.argv[1], "benchmarks"))
import _common
libc = ctypes.CDLL(None, use_errno=True)
def req(feature):  # ARCH_REQ_XCOMP_PERM; 18 = XFEATURE_XTILEDATA (AMX), 2 = SSE (always permitted)
    r = libc.syscall(158, 0x1023, feature)
    return 0 if r == 0 else ctypes.get_errno()
before = req(2)
_common.deny_amx()
child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid() > 0)"], capture_output=True, text=True)
print(before, req(2), req(18), libc.syscall(158, 0x1022, ctypes.byref(ctypes.c_ulong())), child.stdout.strip())
"""
    proc = subprocess.run([sys.executable, "-c", code, ROOT], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    before, sse_after, amx_after, get_perm, child_ok = proc.stdout.split()
    # before: the kernel's own answer (0, EINVAL or EOPNOTSUPP), never EPERM (1); after: EPERM for any feature, while
    # ARCH_GET_XCOMP_PERM (0x1022) still answers and a child process runs
    assert before != "1" and sse_after == amx_after == "1" and get_perm == "0" and child_ok == "True"


def _bench_module(name: str):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(os.path.join(ROOT, "benchmarks"))


def test_synthetic_read_set_has_the_models_step_bytes():
    """The roofline beside llama.cpp (no model in the process) reads what one decode step of the model reads:
    per kernel call, the same array shapes and bytes as `step_read_set` on the model's own weights."""
    import jax.numpy as jnp
    import numpy as np

    import gptoss
    from gptoss import ModelConfig
    from gptoss.model import random_model

    decode = _bench_module("decode")
    cfg = ModelConfig(vocab_size=331, hidden_size=96, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, head_dim=20, num_experts=5, experts_per_token=3,
                      sliding_window=5, layer_types=("sliding_attention", "full_attention"))
    model = random_model(cfg, dtype=jnp.bfloat16)
    real = decode.step_read_set(model, np.random.default_rng(0))
    synthetic = decode.synthetic_read_set(cfg, np.random.default_rng(0), pool=4)()
    assert [[a.nbytes for a in run] for run in synthetic] == [[a.nbytes for a in run] for run in real]
    assert all(a.dtype == np.uint8 and a.flags.c_contiguous and a.min() == 1 for run in synthetic for a in run)
    # packed (q, k, v and the unembedding contract 96: bf12; o contracts 120, no whole blocks: bf16): the same bytes
    # per call but the exceptions (10 bytes each; the synthetic set leaves them out)
    gptoss.pack_dense(model, "bf12")
    real = decode.step_read_set(model, np.random.default_rng(0))
    synthetic = decode.synthetic_read_set(cfg, np.random.default_rng(0), pool=4, dense="bf12")()
    packed = [run for run in real if any(a.dtype == np.int32 for a in run)]
    assert len(packed) == cfg.num_hidden_layers + 1  # per layer q/k/v, then the unembedding
    for ours, syn in zip(real, synthetic):
        exc = sum(a.size for a in ours if a.dtype == np.int32) // 2
        assert sum(a.nbytes for a in ours) - sum(a.nbytes for a in syn) == 10 * exc


def test_paired_rounds_share_each_sides_own_roofline(tmp_path):
    """`paired_decode`: each side's share is its tok/s over the mean of the two roofline reads around it (llama.cpp
    between the first two; ours between its own pair when it brings one, else the second and third), a round is
    steady only when both windows held within 10 %, and the phase-corrected ratio is the median over steady rounds."""
    vs = _bench_module("vs_llama_cpp")
    bench = tmp_path / "bench.py"  # llama-bench's JSON: the best of its samples counts
    bench.write_text("import json; print(json.dumps([{'samples_ts': [9.0, 10.0]}]))")
    cmd = [sys.executable, str(bench)]
    # ours with its own probes: round 0 steady (shares 19/20 and 10/20), round 1 not (its own roofline swung)
    rooflines = iter([20.0, 20.0, 30.0, 30.0])
    ours = iter([(19.0, [20.0, 20.0]), (19.0, [20.0, 30.0])])
    out = vs.paired_decode(cmd, 2, lambda: next(ours), lambda: next(rooflines), ours_probes=True)
    r0, r1 = out["rounds"]
    assert r0["roofline_tok_s"] == [20.0, 20.0, 20.0, 20.0] and r0["steady"]
    assert abs(r0["of_roofline"] - 0.95) < 1e-12 and abs(r0["llama_of_roofline"] - 0.5) < 1e-12
    assert abs(r1["of_roofline"] - 19 / 25) < 1e-12 and abs(r1["llama_of_roofline"] - 10 / 30) < 1e-12
    assert not r1["steady"] and out["steady_rounds"] == 1
    assert abs(out["median_share_ratio"] - 1.9) < 1e-12 and abs(out["median_ratio"] - 1.9) < 1e-12
    # ours in this process: the roofline read after llama.cpp also opens ours' window
    rooflines = iter([20.0, 21.0, 22.0])
    out = vs.paired_decode(cmd, 1, lambda: 21.5, lambda: next(rooflines))
    (r,) = out["rounds"]
    assert r["roofline_tok_s"] == [20.0, 21.0, 22.0] and r["steady"]
    assert abs(r["of_roofline"] - 1.0) < 1e-12 and abs(r["llama_of_roofline"] - 10 / 20.5) < 1e-12
