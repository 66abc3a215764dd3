import atexit
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)  # helper modules (parity_models) import as top-level modules


# -------------------------------------------------------------------------------- compile time
# The suite compiles hundreds of small programs and runs most of them once, so XLA's compile is most of its time.
# Three things cut it without changing what is tested. (1) LLVM's optimisation passes are skipped: the HLO XLA
# builds (fusions, layouts, precision) is the same, only the machine code is slower; GPTOSS_TEST_XLA_OPT=1 keeps
# the default. (2) One persistent compilation cache for the run, shared by the xdist workers and every subprocess
# (a restarted training job, the CLI tests), so a program compiled once is not compiled again. Both reach
# subprocesses through the environment (so does (3)); tests that set XLA_FLAGS for a child start from
# GPTOSS_TEST_XLA_FLAGS.
# (3) XLA:CPU's classic elemental emitters instead of its newer fusion emitters: the same fusions, ~30 % less
# compile time across the suite (measured 2026-11-30, jax 0.10.2); dropped if this XLA no longer knows the flag.
# Their buffers and fp32 operation order are not quite the production ones: a test of what XLA allocates compiles
# with `production_compiler_options` instead.
CHEAP_EMITTERS = "--xla_cpu_use_fusion_emitters=false"


def _xla_knows(flag: str) -> bool:
    probe = "import jax; jax.devices()"  # XLA aborts at start-up on a flag it does not know
    env = {**os.environ, "XLA_FLAGS": flag, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True).returncode == 0


if "GPTOSS_TEST_XLA_FLAGS" not in os.environ:  # the first process of the run (xdist workers inherit this)
    os.environ["GPTOSS_TEST_XLA_FLAGS"] = ("" if os.environ.get("GPTOSS_TEST_XLA_OPT") == "1" else
                                          "--xla_backend_optimization_level=0"
                                          + (f" {CHEAP_EMITTERS}" if _xla_knows(CHEAP_EMITTERS) else ""))
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {os.environ['GPTOSS_TEST_XLA_FLAGS']}".strip()
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        _cache = tempfile.mkdtemp(prefix="gptoss-test-jax-cache-")
        os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
        atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    # every program, not only those over a second: the suite's many sub-second compiles repeat across files and
    # processes (the same tiny model's forward, its generate loop, ...)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


@pytest.fixture(scope="session")
def production_compiler_options() -> dict:
    """`Lowered.compile(compiler_options=...)` that undoes (3) for one program (the LLVM level of (1) does not
    change what XLA allocates)."""
    return {"xla_cpu_use_fusion_emitters": True} if CHEAP_EMITTERS in os.environ["GPTOSS_TEST_XLA_FLAGS"] else {}


# -------------------------------------------------------------------------------- schedule
# `make test` hands whole files to two xdist workers in collection order (with --no-loadscope-reorder: xdist 3.8
# otherwise sorts the files by their number of tests, which put the one-test train-job file last, alone for two
# minutes). Longest first keeps both workers busy to the end: these files go first, in this order (each took
# 40-160 s of a loaded 2-core run, 2026-12-01); the rest keeps its order.
FIRST = ("test_notebooks.py", "apps/test_train_job.py", "sharding/test_sharded_training.py", "sharding/test_sharded.py",
         "model/test_remat.py", "train/test_step.py", "apps/test_demo.py", "test_readme.py", "apps/test_cli.py",
         "apps/test_cli_errors.py", "eval/test_harness.py", "sharding/test_multihost.py")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        path = item.nodeid.split("::")[0].removeprefix("tests/")
        return FIRST.index(path) if path in FIRST else len(FIRST)

    items.sort(key=rank)  # stable


# -------------------------------------------------------------------------------- parity fixtures
# Built once per session; torch/transformers are imported lazily, so tests that do not use them stay fast.


@pytest.fixture(scope="session")
def parity_hf():
    """The tiny random fp32 transformers gpt-oss (eager) that every checkpoint below is written from."""
    from parity_models import PARITY_SEED, make_hf_model

    return make_hf_model(PARITY_SEED)


@pytest.fixture(scope="session")
def parity_tokens():
    from parity_models import PARITY_T, sample_tokens

    return sample_tokens(2, PARITY_T, seed=1)


@pytest.fixture(scope="session")
def parity_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("parity")


@pytest.fixture(scope="session")
def hf_dense_ckpt(parity_hf, parity_dir):
    """transformers save_pretrained of `parity_hf`: fp32, dense experts."""
    from parity_models import save_hf_dense

    return save_hf_dense(parity_hf, parity_dir / "hf_dense")


@pytest.fixture(scope="session")
def hf_mxfp4_ckpt(parity_hf, parity_dir):
    """(path, oracle): a hand-written HF MXFP4 checkpoint (bf16 non-expert tensors, 2 shards + index) and
    transformers' fp32 model loaded from it with Mxfp4Config(dequantize=True)."""
    from parity_models import save_hf_mxfp4

    path = parity_dir / "hf_mxfp4"
    oracle = save_hf_mxfp4(parity_hf, path)
    return path, oracle


@pytest.fixture(scope="session")
def original_root(parity_hf, parity_dir):
    """A hub-snapshot-like root holding only `original/` (same bf16/MXFP4 values as hf_mxfp4_ckpt)."""
    from parity_models import save_original

    return save_original(parity_hf, parity_dir / "snapshot")


@pytest.fixture(scope="session")
def bf16_mxfp4_ckpt(parity_dir):
    """(path, oracle) like hf_mxfp4_ckpt, for the CONFIDENT variant of the tiny model (the bf16 test)."""
    from parity_models import CONFIDENT, PARITY_SEED, make_hf_model, save_hf_mxfp4

    path = parity_dir / "hf_mxfp4_confident"
    oracle = save_hf_mxfp4(make_hf_model(PARITY_SEED, **CONFIDENT), path)
    return path, oracle


# ---------------------------------------------------------------------------------------------- hypothesis
# Fixed example sequences in the suite (a red CI must be reproducible); GPTOSS_HYPOTHESIS_RANDOM=1 explores anew.
from hypothesis import settings  # noqa: E402

settings.register_profile("gptoss", derandomize=os.environ.get("GPTOSS_HYPOTHESIS_RANDOM") != "1", database=None)
settings.load_profile("gptoss")
