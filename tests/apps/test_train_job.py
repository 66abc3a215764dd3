"""The training job end to end (`gptoss run configs/finetune/tiny-lora.yaml`): it learns, writes metrics, a loss
curve, checkpoints and adapters; killed with SIGKILL at random points (saves included), it resumes from the last
complete checkpoint and ends bit-identical to an uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parents[2]
CONFIG = "configs/finetune/tiny-lora.yaml"
OVERRIDES = ["steps=4", "optim.total_steps=4", "save_every=2", "data.batch_size=2"]  # short: three runs

pytestmark = pytest.mark.slow


def _cmd(out):
    return [sys.executable, "-m", "gptoss.cli", "run", CONFIG, f"output_dir={out}", *OVERRIDES]


def _env():
    env = dict(os.environ)
    env["XLA_FLAGS"] = os.environ.get("GPTOSS_TEST_XLA_FLAGS", "")
    env["GPTOSS_KERNELS"] = "xla"
    return env


def _logged(out) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _finished(out):
    return json.loads((out / "results.json").read_text())


def test_train_job_resumes_bit_identically_after_sigkill(tmp_path):
    clean = tmp_path / "clean"
    subprocess.run(_cmd(clean), cwd=ROOT, env=_env(), check=True, capture_output=True, timeout=600)
    want = _finished(clean)
    assert want["final_loss"] < want["first_loss"]
    rows = [json.loads(line) for line in (clean / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 5)) and all(r["tokens_per_s"] > 0 for r in rows)
    assert (clean / "loss.png").stat().st_size > 1000

    killed = tmp_path / "killed"
    rng = random.Random(0)
    for target in (3,):  # kill once the run has logged step `target`, a random moment later (checkpoints are
        # written right after steps 2 and 4, so the kill can land in step 4 or inside its save)
        proc = subprocess.Popen(_cmd(killed), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while _logged(killed) < target and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    subprocess.run(_cmd(killed), cwd=ROOT, env=_env(), check=True, capture_output=True, timeout=600)
    got = _finished(killed)
    assert got["resumed_from"] >= 2
    assert got["final_loss"] == want["final_loss"]
    again = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in again] == list(range(1, 5))
    assert [r["nll"] for r in again] == [r["nll"] for r in rows]
    a, b = load_file(str(clean / "adapters" / "adapter_model.safetensors")), load_file(
        str(killed / "adapters" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
