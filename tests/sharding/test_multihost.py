"""Two processes on localhost (JAX distributed runtime, gloo CPU collectives), 2 virtual CPU devices each,
give the same logits (every process reads all of them from `model(tokens)`) and greedy tokens (`generate` and
`generate_stream`) as one process, and each process holds only its own expert shards."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from sharding_tiny import CFG, random_model

import gptoss
from gptoss.engine import generate

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
NEW = 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    ckpt = tmp_path / "ckpt"
    gptoss.save_pretrained(random_model(CFG), ckpt)
    rng = np.random.default_rng(5)
    tokens = rng.integers(0, CFG.vocab_size, (2, 10)).astype(np.int32)
    prompts = [rng.integers(0, CFG.vocab_size, n).tolist() for n in (7, 4)]
    padded = np.full((len(prompts), max(map(len, prompts))), -1, np.int64)
    for i, p in enumerate(prompts):
        padded[i, : len(p)] = p
    np.savez(tmp_path / "in.npz", tokens=tokens, prompts=padded, new=NEW)

    ref = gptoss.from_pretrained(ckpt, dtype="float32", progress=False)
    ref_logits = np.asarray(ref(tokens))
    ref_tokens = generate(ref, prompts, max_new_tokens=NEW).tokens

    port = _free_port()
    procs = []
    for pid in range(2):
        flags = "--xla_force_host_platform_device_count=2 " + os.environ.get("GPTOSS_TEST_XLA_FLAGS", "")
        env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                   JAX_PROCESS_ID=str(pid), XLA_FLAGS=flags,
                   JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        procs.append(subprocess.Popen(
            [sys.executable, os.path.join(HERE, "multihost_worker.py"), str(ckpt), str(tmp_path / "in.npz"),
             str(tmp_path / "out"), "data=1,expert=2,tensor=2"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=150)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("multi-process run timed out:\n" + "\n".join(q.communicate()[0][-3000:] for q in procs))
    for p, log in zip(procs, logs):
        assert p.returncode == 0, f"worker failed (rc={p.returncode}):\n{log[-4000:]}"

    reports = [json.load(open(tmp_path / f"out.{i}.json")) for i in range(2)]
    for i, r in enumerate(reports):
        assert (r["multi"], r["process"], r["processes"]) == (True, i, 2)
        assert (r["local_devices"], r["global_devices"]) == (2, 4)
        assert r["mesh"] == {"data": 1, "expert": 2, "tensor": 2}
        assert r["tokens"] == ref_tokens, f"process {i}: greedy tokens differ from one process"
        assert r["streamed"] == ref_tokens, f"process {i}: generate_stream's tokens differ from one process"
        # expert axis spans the processes: each holds exactly half of the packed expert bytes
        assert r["expert_bytes"]["addressable"] * 2 == r["expert_bytes"]["global"]
    for i in range(2):
        logits = np.load(tmp_path / f"out.logits.{i}.npy")
        np.testing.assert_allclose(logits, ref_logits, rtol=0, atol=1e-5, err_msg=f"process {i}")
