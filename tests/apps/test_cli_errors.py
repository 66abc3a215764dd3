"""A user's mistakes at the command line, each run as a user runs it (a subprocess): exit status 2, no Python
traceback, and a message that names the culprit (the flag, file, key or value). `--debug` shows the traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "inference", "tiny.yaml")

# (arguments, what the message must name); {empty} is an empty folder
CASES = [
    (["generate", "--model", "/no/such/dir", "--prompt", "hi"], ["/no/such/dir", "no such folder"]),
    (["generate", "--model", "{empty}", "--prompt", "hi"], ["{empty}", "no gpt-oss checkpoint"]),
    (["info", "tiny"], ["tiny", "not a folder"]),
    (["run", TINY, "sampling.temprature=0.5"], ["override 'sampling.temprature=0.5'", "unknown key"]),
    (["run", TINY, "sampling.temperature=hot"], ["override 'sampling.temperature=hot'", "must be float"]),
    (["run", TINY, "model.preset=gpt-oss-20b"], ["override 'model.preset=gpt-oss-20b'", "model.path"]),
    (["run", TINY, "model.dtype=banana"], ["override 'model.dtype=banana'", "model.dtype", "float32"]),
    (["run", TINY, "model.dtype=float16"], ["model.dtype", "'float16'"]),
    (["run", TINY, "model.moe_impl=fast"], ["model.moe_impl", "'fast'", "grouped"]),
    (["run", "/no/such.yaml"], ["/no/such.yaml", "not found"]),
    (["generate", "--model", "tiny", "--prompt", "hi", "--max-new-tokens", "0"], ["--max-new-tokens", "positive"]),
    (["plan", "--model", "gpt-oss-20b", "--mesh", "expert=3"], ["expert", "num_experts=32"]),
    (["plan", "--model", "gpt-oss-20b", "--device", "rtx4090"], ["rtx4090", "h100"]),
    (["generate", "--model", "tiny", "--prompt", "hi", "--dtype", "int8"], ["--dtype", "int8"]),
    # a hub id on a machine without huggingface_hub (hidden from this interpreter)
    (["{no-hub}", "generate", "--model", "openai/gpt-oss-20b", "--prompt", "hi"],
     ["openai/gpt-oss-20b", "huggingface_hub is not installed", "gptoss[hub]"]),
]
NO_HUB = "import sys; sys.modules['huggingface_hub'] = None; from gptoss.cli import main; sys.exit(main(sys.argv[1:]))"


def _env():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    env.pop("GPTOSS_DEBUG", None)
    return env


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """All cases at once (each is a fresh interpreter: run them in parallel)."""
    empty = str(tmp_path_factory.mktemp("empty"))
    procs = []
    for args, _ in CASES:
        argv = [a.replace("{empty}", empty) for a in args]
        cmd = ["-c", NO_HUB, *argv[1:]] if argv[0] == "{no-hub}" else ["-m", "gptoss.cli", *argv]
        procs.append(subprocess.Popen([sys.executable, *cmd], env=_env(), cwd=ROOT, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    out = [(p.communicate(timeout=300), p.returncode) for p in procs]
    return empty, out


@pytest.mark.parametrize("i", range(len(CASES)), ids=[" ".join(a[:4]) for a, _ in CASES])
def test_mistake_is_named_without_a_traceback(runs, i):
    empty, out = runs
    (stdout, stderr), rc = out[i]
    args, names = CASES[i]
    assert rc == 2, (args, rc, stderr[-2000:])
    assert "Traceback" not in stderr + stdout, stderr[-2000:]
    message = [line for line in stderr.splitlines() if "error" in line]
    assert message, stderr
    for name in names:
        assert name.replace("{empty}", empty) in message[-1], (name, message[-1])


def test_debug_shows_the_traceback():
    proc = subprocess.run([sys.executable, "-m", "gptoss.cli", "--debug", "run", TINY, "model.dtype=banana"],
                          env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "model.dtype" in proc.stderr
