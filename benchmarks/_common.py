"""Shared helpers for the benchmark scripts (not tests): memory, timing, tables, JSON, synthetic checkpoints.

Peak memory is read from the kernel: `VmHWM` in /proc/self/status is the high-water resident set of the
current address space, which starts fresh at exec; `ru_maxrss` can inherit the parent's high-water mark
when the child was started with vfork+exec, so it is reported only as a cross-check.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

RESULTS_DIR = Path(__file__).resolve().parent / "results"
GIB = 1024**3


# ---------------------------------------------------------------------------------------------- memory
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def rss_bytes() -> int:
    """Current resident set size of this process."""
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """High-water resident set size of this process since its exec (VmHWM)."""
    return _status_kib("VmHWM") * 1024


def ru_maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def available_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


class RssSampler:
    """Samples this process's RSS every `interval` s in a thread; keeps the peak and the label current at it.

    Set `.label` from the code being measured to attribute the peak; `.window_peak()` returns and resets the
    peak since the last call (for per-step attribution).
    """

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.label = "start"
        self.peak, self.peak_label = 0, "start"
        self._window = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.interval)

    def _sample(self):
        r = rss_bytes()
        if r > self.peak:
            self.peak, self.peak_label = r, self.label
        self._window = max(self._window, r)

    def window_peak(self) -> int:
        self._sample()
        w, self._window = self._window, 0
        return w

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()


# ---------------------------------------------------------------------------------------------- timing
def time_runs(fn: Callable[[], Any], runs: int) -> dict[str, Any]:
    """Calls fn `runs` times (fn must block until its result is ready): wall and process CPU times, medians.

    CPU seconds (all threads of this process) are a cross-check on a shared machine: wall time grows when other
    processes compete for the cores, CPU time much less."""
    times, cpu, usage = [], [], []
    for _ in range(runs):
        r0, c0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.process_time(), time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        usage.append({"user_s": round(r1.ru_utime - r0.ru_utime, 3), "sys_s": round(r1.ru_stime - r0.ru_stime, 3),
                      "minor_faults": r1.ru_minflt - r0.ru_minflt, "major_faults": r1.ru_majflt - r0.ru_majflt,
                      "invol_ctx_switches": r1.ru_nivcsw - r0.ru_nivcsw, "loadavg1": round(os.getloadavg()[0], 2)})
    return {"times_s": [round(t, 4) for t in times], "median_s": statistics.median(times), "min_s": min(times),
            "cpu_s": [round(c, 4) for c in cpu], "median_cpu_s": statistics.median(cpu), "rusage": usage}


# ---------------------------------------------------------------------------------------------- reporting
def bandwidth_summary(times: Sequence[float], nbytes: int) -> dict[str, Any]:
    """Median and best time of repeated runs that each move `nbytes`, with the GB/s of both."""
    med, best = statistics.median(times), min(times)
    return {"median_s": med, "min_s": best, "median_GBps": nbytes / med / 1e9, "best_GBps": nbytes / best / 1e9,
            "runs": len(times)}


def machine_info() -> dict[str, Any]:
    cpu_model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = {}
    for pkg in ("jax", "jaxlib", "flax", "numpy", "ml_dtypes", "torch", "transformers", "safetensors", "psutil"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(), "cpu_affinity": len(os.sched_getaffinity(0)), "cpu_model": cpu_model,
        "python": platform.python_version(), "platform": platform.platform(), "versions": versions,
        "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],
    }
    info["code"] = code_state()
    try:
        import psutil

        vm = psutil.virtual_memory()
        info["mem_total_gib"] = round(vm.total / GIB, 2)
        info["mem_available_gib"] = round(vm.available / GIB, 2)
    except ImportError:
        pass
    return info


def code_state() -> dict[str, Any]:
    """Which gptoss is imported (a snapshot via PYTHONPATH, or the repo) and the repo's git state."""
    import hashlib
    import importlib.util

    spec = importlib.util.find_spec("gptoss")
    repo = Path(__file__).resolve().parent.parent
    path = Path(spec.origin).parent if spec and spec.origin else None
    # when gptoss is imported from elsewhere (a frozen copy on PYTHONPATH), the repo state below is not its state
    out: dict[str, Any] = {"gptoss_path": str(path) if path else None,
                           "gptoss_from_this_repo": bool(path and path.is_relative_to(repo))}
    try:
        git = ["git", "-C", str(repo)]
        out["repo_head"] = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(git + ["status", "--porcelain", "--", "gptoss", "csrc"], capture_output=True,
                               text=True).stdout.splitlines()
        out["repo_dirty"] = dirty
        diff = subprocess.run(git + ["diff", "HEAD", "--", "gptoss", "csrc"], capture_output=True).stdout
        out["repo_diff_sha1"] = hashlib.sha1(diff).hexdigest()
    except OSError as e:
        out["git_error"] = str(e)
    return out


def kernel_state() -> dict[str, Any]:
    """Whether a gptoss model built now (kernels from $GPTOSS_KERNELS) would run gptoss's CPU kernels (XLA FFI)."""
    try:
        from gptoss.kernels import mxfp4_cpu, select
    except ImportError:
        return {"present": False}
    mode = select.default_kernels()
    return {"present": True, "mode": mode, "enabled": select.cpu_kernels(mode), "isa": mxfp4_cpu.isa(),
            "exact_gemv": mxfp4_cpu.exact_gemv(), "x16": mxfp4_cpu.x16_active(), "x8": mxfp4_cpu.x8_active(),
            "gemv_input": mxfp4_cpu.gemv_input(), "load_error": mxfp4_cpu.load_error(),
            "env": os.environ.get(select.ENV)}


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[_cell(c) for c in row] + [""] * (len(headers) - len(row)) for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "-+-".join("-" * w for w in widths)
    print(f"\n{title}")
    print(" | ".join(h.ljust(w) for h, w in zip(headers, widths)))
    print(line)
    for r in cells:
        print(" | ".join(c.rjust(w) if _numeric(c) else c.ljust(w) for c, w in zip(r, widths)))
    sys.stdout.flush()


def _cell(c: Any) -> str:
    if c is None:
        return "-"
    if isinstance(c, float):
        return f"{c:.3g}" if abs(c) < 100 else f"{c:.0f}"
    return str(c)


def _numeric(s: str) -> bool:
    try:
        float(s.rstrip("x%"))
        return True
    except ValueError:
        return False


def write_json(name: str, obj: Any) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, default=_json_default)
        f.write("\n")
    return path


def _json_default(o: Any):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o)}")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- no AMX
def deny_amx() -> None:
    """From now on this process and every process it starts cannot enable AMX tiles: a seccomp filter answers
    Linux's arch_prctl(ARCH_REQ_XCOMP_PERM) with EPERM, so gptoss's kernels, XLA's YNNPACK GEMMs, oneDNN (torch) and
    ggml all take their AVX-512 (BF16) paths. A stand-in on an AMX Xeon for a CPU with AVX-512 BF16 but no AMX
    (AMD Zen 4/5); the VDPBF16PS rate differs between those cores, so it is a proxy, not the same machine.
    Call it before anything imports jax or torch. x86-64 Linux only."""
    import ctypes
    import struct

    if sys.platform != "linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        raise RuntimeError(f"--no-amx needs x86-64 Linux, this is {sys.platform}/{platform.machine()}")
    sys_arch_prctl, arch_req_xcomp_perm, audit_arch_x86_64 = 158, 0x1023, 0xC000003E
    ld_abs, jeq_k, ret_k = 0x20, 0x15, 0x06  # BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, BPF_RET|BPF_K
    allow, eperm = 0x7FFF0000, 0x00050000 | 1  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | EPERM
    prog = [  # seccomp_data: nr at 0, arch at 4, args[0] at 16 (low half)
        (ld_abs, 0, 0, 4), (jeq_k, 0, 5, audit_arch_x86_64),  # jt / jf: instructions to skip
        (ld_abs, 0, 0, 0), (jeq_k, 0, 3, sys_arch_prctl),
        (ld_abs, 0, 0, 16), (jeq_k, 0, 1, arch_req_xcomp_perm),
        (ret_k, 0, 0, eperm), (ret_k, 0, 0, allow),
    ]
    filters = ctypes.create_string_buffer(b"".join(struct.pack("=HBBI", *f) for f in prog))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(prog), ctypes.addressof(filters))
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_no_new_privs, pr_set_seccomp, seccomp_mode_filter = 38, 22, 2
    if (libc.prctl(pr_set_no_new_privs, 1, 0, 0, 0) != 0
            or libc.prctl(pr_set_seccomp, seccomp_mode_filter, ctypes.byref(fprog), 0, 0) != 0):
        raise OSError(ctypes.get_errno(), "--no-amx: installing the seccomp filter failed")


# ---------------------------------------------------------------------------------------------- children
def run_child(script: str, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Runs `python script --child <spec json>` in a fresh process; the child writes its result to spec["out"]."""
    out = spec["out"]
    if os.path.exists(out):
        os.remove(out)
    t0 = time.perf_counter()
    try:
        env = {**os.environ, **spec.get("env", {})}
        proc = subprocess.run([sys.executable, script, "--child", json.dumps(spec)], timeout=timeout, env=env)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    wall = time.perf_counter() - t0
    if rc == 0 and os.path.exists(out):
        with open(out) as f:
            res = json.load(f)
    else:
        res = {"error": f"child exited with {rc}" + (" (killed: out of memory?)" if rc == -9 else "")}
    res["child_wall_s"] = round(wall, 2)
    return res


def child_finish(spec: dict[str, Any], result: dict[str, Any]) -> None:
    result["peak_rss_bytes"] = peak_rss_bytes()
    result["ru_maxrss_bytes"] = ru_maxrss_bytes()
    with open(spec["out"], "w") as f:
        json.dump(result, f, default=_json_default)


def interrupt_on_sigterm() -> None:
    """Turns SIGTERM into KeyboardInterrupt, so `finally:` clean-up (temporary folders) runs on kill."""
    import signal

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def drop_page_cache() -> tuple[bool, str]:
    """Tries `sync; echo 1 > /proc/sys/vm/drop_caches` (root only); returns (worked, message)."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return True, "dropped"
    except OSError as e:
        return False, f"{type(e).__name__}: {e}"


# ---------------------------------------------------------------------------------------------- checkpoints
def checkpoint_tensors(cfg) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, safetensors dtype code, shape) of an HF MXFP4 gpt-oss checkpoint, in keymap order."""
    from gptoss.io.keymap import hf_entries

    out = []
    for e in hf_entries(cfg, "mxfp4"):
        for name, shape in zip(e.names, e.shapes):
            out.append((name, "U8" if e.kind == "mxfp4" else "BF16", tuple(shape)))
    return out


def tensor_nbytes(code: str, shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64)) * (1 if code == "U8" else 2)


def _stream_kind(name: str) -> str:
    if name.endswith("_blocks"):
        return "blocks"
    if name.endswith("_scales"):
        return "scales"
    if name.endswith("norm.weight"):
        return "norm"
    if name.endswith("sinks"):
        return "sinks"
    if name.endswith("bias"):
        return "bias"
    return "weight"


def _random_fill(kind: str, n: int, rng: np.random.Generator, scale_lo: int, scale_hi: int) -> np.ndarray:
    """n values of one tensor kind, flat, in the checkpoint dtype (bf16 or uint8)."""
    import ml_dtypes

    if kind == "blocks":
        return rng.integers(0, 256, n, dtype=np.uint8)
    if kind == "scales":
        return rng.integers(scale_lo, scale_hi + 1, n, dtype=np.uint8)
    mean, std = {"norm": (1.0, 0.05), "sinks": (0.0, 0.5), "bias": (0.0, 0.01), "weight": (0.0, 0.02)}[kind]
    out = np.empty(n, ml_dtypes.bfloat16)
    chunk = 1 << 24
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        out[s:s + m] = (rng.standard_normal(m, dtype=np.float32) * std + mean).astype(ml_dtypes.bfloat16)
    return out


class _Filler:
    """Makes tensor contents. mode="random": fresh random values per tensor (seeded by name).
    mode="tiled": a ~1M-element random pattern per kind, rotated per tensor and tiled (cheap: a memcpy)."""

    PATTERN = (1 << 20) + 17

    def __init__(self, mode: str, seed: int, scale_lo: int, scale_hi: int):
        if mode not in ("random", "tiled"):
            raise ValueError(mode)
        self.mode, self.seed, self.lo, self.hi = mode, seed, scale_lo, scale_hi
        self._patterns: dict[str, np.ndarray] = {}

    def __call__(self, name: str, code: str, shape: tuple[int, ...]) -> np.ndarray:
        kind = _stream_kind(name)
        n = int(np.prod(shape, dtype=np.int64))
        h = zlib.crc32(name.encode())
        if self.mode == "random":
            rng = np.random.default_rng([self.seed, h])
            return _random_fill(kind, n, rng, self.lo, self.hi).reshape(shape)
        if kind not in self._patterns:
            rng = np.random.default_rng([self.seed, zlib.crc32(kind.encode())])
            self._patterns[kind] = _random_fill(kind, self.PATTERN, rng, self.lo, self.hi)
        pat = self._patterns[kind]
        start = h % len(pat)
        pat = np.concatenate([pat[start:], pat[:start]])
        out = np.empty(n, pat.dtype)
        full = n // len(pat)
        if full:
            out[:full * len(pat)].reshape(full, len(pat))[:] = pat
        out[full * len(pat):] = pat[:n - full * len(pat)]
        return out.reshape(shape)


def write_synthetic_hf_mxfp4(folder: str, cfg, *, fill: str = "random", n_shards: int = 1, seed: int = 0,
                             scale_range: tuple[int, int] = (116, 120)) -> dict[str, Any]:
    """Writes an HF-layout MXFP4 gpt-oss checkpoint (config.json, shards, index) tensor by tensor.

    Never holds more than one tensor (plus, in "tiled" mode, a ~2 MiB pattern per kind). Shards are named like
    the hub's (`model-00000-of-00002.safetensors` for 3 shards), split by bytes in keymap order. Scale bytes are
    drawn from `scale_range`: 2**(s-127) with 116..120 gives dequantized |w| <= 6 * 2**-7 = 0.047, rms ~0.012.
    (118..122, rms ~0.05, makes the random 6-layer model chaotic: each MoE output dwarfs the residual stream, so
    bf16 rounding flips routing and ours-fp32 vs ours-bf16 greedy top-1 agreement falls to ~60-75%; with
    116..120 it is ~98%, which is what lets the top-1 check against transformers mean something.)
    Returns {"total_bytes" (tensor data only), "file_bytes", "files", "seconds"}.
    """
    from gptoss.io.keymap import QUANTIZATION_CONFIG
    from gptoss.io.safetensors_io import write_file

    t0 = time.perf_counter()
    os.makedirs(folder, exist_ok=True)
    tensors = checkpoint_tensors(cfg)
    total = sum(tensor_nbytes(c, s) for _, c, s in tensors)
    target = total / n_shards
    shards: list[list] = [[]]
    size = 0
    for t in tensors:
        nb = tensor_nbytes(t[1], t[2])
        if shards[-1] and size + nb / 2 > target and len(shards) < n_shards:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nb
    last = len(shards) - 1
    names = (["model.safetensors"] if len(shards) == 1
             else [f"model-{i:05d}-of-{last:05d}.safetensors" for i in range(len(shards))])
    filler = _Filler(fill, seed, *scale_range)
    for fname, shard in zip(names, shards):
        log(f"writing {fname} ({sum(tensor_nbytes(c, s) for _, c, s in shard) / GIB:.2f} GiB, {len(shard)} tensors)")
        write_file(os.path.join(folder, fname),
                   [(n, c, s, lambda n=n, c=c, s=s: filler(n, c, s)) for n, c, s in shard])
    if len(shards) > 1:
        weight_map = {n: fname for fname, shard in zip(names, shards) for n, _, _ in shard}
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    config = cfg.to_hf()
    config.update(dtype="bfloat16", torch_dtype="bfloat16", quantization_config=dict(QUANTIZATION_CONFIG))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    files = [os.path.join(folder, n) for n in names]
    return {"total_bytes": total, "file_bytes": sum(os.path.getsize(p) for p in files), "files": names,
            "seconds": round(time.perf_counter() - t0, 2)}


def param_bytes(model) -> int:
    """Sum of nbytes over every array leaf of an NNX model's state (packed MXFP4 counts its bytes)."""
    import jax
    from flax import nnx

    return int(sum(leaf.nbytes for leaf in jax.tree.leaves(nnx.state(model)) if hasattr(leaf, "nbytes")))
