"""CPU prefill/decode: gptoss vs llama.cpp, back to back, on the same synthetic MXFP4 gpt-oss checkpoint.

Checkpoints: 6 layers at real gpt-oss-20b widths (32 experts), and with `--shape-20b` also the gpt-oss-20b shape
(24 layers). llama.cpp side: its own converter (`convert_hf_to_gguf.py`, experts stay GGML MXFP4, the rest bf16)
and `llama-bench -p P -n N -t T` (pp: a P-token prompt; tg: N decoded tokens from an empty context). gptoss side:
`from_pretrained(dtype="bfloat16")` + `engine.generate` at batch 1 on a P-token prompt, pinned to T cores;
prefill = P / time to first token (median of runs), decode = 1 / the median time between decode steps (generate's
per-step progress callback, all steps of the runs). Each side in its own process. Also a greedy cross-check: the
same text prompt, 8 greedy tokens from each side.

llama.cpp comes from `--llama-bench PATH`, `$LLAMA_BENCH` or `llama-bench` on PATH, else is built once from the
llama.cpp vendored in the `llama-cpp-python` sdist (pip download; cmake + ninja + a C++ compiler) into
~/.cache/gptoss/llama.cpp/<version>; the converter comes from the same sources (`--llama-src DIR` or
$LLAMA_CPP_SRC to use a checkout). It needs torch, transformers, tqdm, pyyaml, requests (all in the venv) and
the vendored gguf-py. The o200k_harmony tokenizer.json it needs is written from the `bpe-openai` ranks. Without
llama.cpp the gptoss side still runs. Not part of `make test`.

    .venv/bin/python benchmarks/vs_llama_cpp.py --quick      # 2 layers, prompt 32, 8 tokens: a smoke run
    .venv/bin/python benchmarks/vs_llama_cpp.py              # 6 layers, prompt 128, 32 tokens, 2 threads
    .venv/bin/python benchmarks/vs_llama_cpp.py --shape-20b  # plus the 24-layer 20b shape (~26 GiB of /tmp)
    .venv/bin/python benchmarks/vs_llama_cpp.py --no-amx     # an AMX CPU with AMX denied to both sides
    .venv/bin/python benchmarks/vs_llama_cpp.py --paired 6   # decode alternated llama.cpp / gptoss / roofline
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from _common import (
    GIB,
    child_finish,
    deny_amx,
    interrupt_on_sigterm,
    kernel_state,
    log,
    machine_info,
    print_table,
    run_child,
    write_json,
    write_synthetic_hf_mxfp4,
)
from decode import bench_config, prompts_for, stream_read_gbps

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gptoss" / "llama.cpp"
CHECK_TEXT = "The quick brown fox jumps over the lazy dog. In 1905, Einstein published four papers that"
CHECK_NEW = 8


# ---------------------------------------------------------------------------------------------- llama.cpp
class Unavailable(RuntimeError):
    """llama.cpp (binary or converter) cannot be had here; the message says why."""


def _version_key(v: str) -> tuple:
    return tuple(int(x) if x.isdigit() else x for x in re.split(r"[.+-]", v))


def _cached_versions() -> list[Path]:
    """Cache folders with extracted sources, newest version first."""
    dirs = [p for p in CACHE.glob("*") if (p / "src" / "convert_hf_to_gguf.py").exists()]
    return sorted(dirs, key=lambda p: _version_key(p.name), reverse=True)


def _download_sources() -> Path:
    """pip-downloads the llama-cpp-python sdist and extracts its vendor/llama.cpp into CACHE/<version>/src."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        log("llama.cpp: pip download llama-cpp-python (sdist) ...")
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "pip", "download", "llama-cpp-python", "--no-binary", ":all:", "--no-deps",
               "-q", "-d", tmp]
        r = subprocess.run(cmd, capture_output=True, text=True)
        sdists = glob.glob(os.path.join(tmp, "llama_cpp_python-*.tar.gz"))
        if r.returncode or not sdists:
            raise Unavailable(f"pip download llama-cpp-python failed: {(r.stderr or r.stdout).strip()[-500:]}")
        version = os.path.basename(sdists[0])[len("llama_cpp_python-"):-len(".tar.gz")]
        dest = CACHE / version
        log(f"llama.cpp: got llama-cpp-python {version} in {time.perf_counter() - t0:.0f}s; extracting")
        with tarfile.open(sdists[0]) as tar:
            prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            if not members:
                raise Unavailable(f"the llama-cpp-python {version} sdist has no vendor/llama.cpp")
            tar.extractall(tmp, members=members, filter="data")
        shutil.rmtree(dest / "src", ignore_errors=True)
        dest.mkdir(exist_ok=True)
        os.rename(os.path.join(tmp, prefix), dest / "src")
    return dest


def llama_sources(src_arg: str | None) -> Path:
    """A llama.cpp source tree (for the converter and the build): the argument, $LLAMA_CPP_SRC, cache, download."""
    src = src_arg or os.environ.get("LLAMA_CPP_SRC")
    if src:
        if not (Path(src) / "convert_hf_to_gguf.py").exists():
            raise Unavailable(f"{src} has no convert_hf_to_gguf.py")
        return Path(src)
    cached = _cached_versions()
    return (cached[0] if cached else _download_sources()) / "src"


def _build(src: Path, out: Path, jobs: int) -> dict:
    """cmake + ninja build of llama-bench and llama-simple (static, native ISA) into out/bin; logs to out/build.log."""
    for tool in ("cmake", "ninja"):
        if not shutil.which(tool):
            raise Unavailable(f"no {tool} on PATH to build llama.cpp")
    if not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
        raise Unavailable("no C++ compiler on PATH to build llama.cpp")
    build, logfile = out / "build", out / "build.log"
    base = ["cmake", "-S", str(src), "-B", str(build), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
            "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
            "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=ON", "-DLLAMA_BUILD_SERVER=OFF",
            "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF"]
    log(f"llama.cpp: building llama-bench in {build} ({jobs} jobs; log {logfile}) ...")
    t0 = time.perf_counter()
    with open(logfile, "w") as lf:
        for openmp in ("ON", "OFF"):  # OpenMP when the toolchain has it
            shutil.rmtree(build, ignore_errors=True)
            if subprocess.run(base + [f"-DGGML_OPENMP={openmp}"], stdout=lf, stderr=subprocess.STDOUT).returncode == 0:
                break
        else:
            raise Unavailable(f"cmake could not configure llama.cpp (see {logfile}):\n{_tail(str(logfile))}")
        ok = subprocess.run(["cmake", "--build", str(build), "-j", str(jobs), "--target", "llama-bench",
                             "llama-simple"], stdout=lf, stderr=subprocess.STDOUT).returncode == 0
    seconds = time.perf_counter() - t0
    if not ok:
        raise Unavailable(f"llama.cpp build failed after {seconds:.0f}s (see {logfile}):\n{_tail(str(logfile))}")
    (out / "bin").mkdir(exist_ok=True)
    for name in ("llama-bench", "llama-simple"):
        shutil.copy2(build / "bin" / name, out / "bin" / name)
    info = {"seconds": round(seconds, 1), "openmp": openmp, "jobs": jobs, "flags": base[5:]}
    (out / "build.json").write_text(json.dumps(info, indent=2))
    shutil.rmtree(build, ignore_errors=True)
    log(f"llama.cpp: built in {seconds:.0f}s")
    return info


def find_llama(args) -> dict:
    """The llama-bench binary (+ llama-simple when next to it) and the converter's source tree; raises Unavailable."""
    given = args.llama_bench or os.environ.get("LLAMA_BENCH") or shutil.which("llama-bench")
    src = llama_sources(args.llama_src)
    if given:
        bench = Path(given)
        if not os.access(bench, os.X_OK):
            raise Unavailable(f"llama-bench {bench} is not an executable")
        simple = bench.with_name("llama-simple")
        return {"bench": str(bench), "simple": str(simple) if simple.exists() else None, "src": str(src),
                "origin": "given", "build": None}
    if src.name == "src" and src.parent.parent == CACHE:
        out, origin = src.parent, f"built from the llama.cpp of llama-cpp-python {src.parent.name}"
    else:  # a checkout given by --llama-src: one cache folder per path
        out = CACHE / f"custom-{hashlib.sha1(str(src.resolve()).encode()).hexdigest()[:10]}"
        origin = f"built from {src}"
    out.mkdir(parents=True, exist_ok=True)
    if (out / "bin" / "llama-bench").exists():
        build = json.loads((out / "build.json").read_text()) | {"cached": True}
        log(f"llama.cpp: using the cached build in {out}")
    else:
        build = _build(src, out, args.jobs) | {"cached": False}
    return {"bench": str(out / "bin" / "llama-bench"), "simple": str(out / "bin" / "llama-simple"), "src": str(src),
            "origin": origin, "build": build}


def write_tokenizer(folder: str) -> dict:
    """Writes o200k_harmony as an HF tokenizer.json (+ tokenizer_config.json) into `folder`, cached under CACHE.

    The ranks come from the bpe-openai wheel (gptoss.tokenizer); transformers' TikTokenConverter makes the
    byte-level BPE (merges, the o200k regex, the 1090 harmony specials at 199998..201087). llama.cpp's converter
    recognizes its pre-tokenizer by hash as "gpt-4o", as for the real gpt-oss tokenizer."""
    cached = CACHE / "o200k_harmony"
    if not (cached / "tokenizer.json").exists():
        from transformers.convert_slow_tokenizer import TikTokenConverter

        from gptoss.tokenizer import (
            O200K_PATTERN,
            o200k_harmony_special_tokens,
            packaged_o200k_base,
            parse_tiktoken_ranks,
        )

        t0 = time.perf_counter()
        ranks = parse_tiktoken_ranks(packaged_o200k_base())
        conv = TikTokenConverter(pattern=O200K_PATTERN, extra_special_tokens=list(o200k_harmony_special_tokens()))
        conv.load_tiktoken_bpe = lambda _: ranks  # the ranks are already loaded (no file, no download)
        tok = conv.converted()
        if tok.get_vocab_size() != 201088 or tok.token_to_id("<|start|>") != 200006:
            raise Unavailable("the converted o200k_harmony tokenizer has the wrong ids")
        cached.mkdir(parents=True, exist_ok=True)
        tok.save(str(cached / "tokenizer.json.tmp"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|startoftext|>",
                  "eos_token": "<|return|>", "pad_token": "<|endoftext|>", "add_bos_token": False,
                  "add_eos_token": False, "model_max_length": 131072}
        (cached / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
        os.replace(cached / "tokenizer.json.tmp", cached / "tokenizer.json")
        log(f"tokenizer.json (o200k_harmony) written in {time.perf_counter() - t0:.0f}s")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(cached / name, os.path.join(folder, name))
    return {"source": "bpe-openai o200k_base + harmony specials, via transformers TikTokenConverter",
            "cached": str(cached)}


def _tail(path: str, n: int = 1500) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-n:]


def convert(llama: dict, ckpt: str, gguf: str, logfile: str) -> dict:
    """Runs llama.cpp's convert_hf_to_gguf.py (bf16 outtype: MXFP4 experts stay MXFP4) with the vendored gguf-py."""
    src = llama["src"]
    path = os.pathsep.join([os.path.join(src, "gguf-py"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    part = gguf + ".part"  # renamed when complete: --keep reuses only whole GGUFs
    cmd = [sys.executable, os.path.join(src, "convert_hf_to_gguf.py"), ckpt, "--outfile", part, "--outtype", "bf16"]
    log(f"llama.cpp: converting to {gguf} ...")
    t0 = time.perf_counter()
    with open(logfile, "w") as lf:
        rc = subprocess.run(cmd, stdout=lf, stderr=subprocess.STDOUT, env=env).returncode
    if rc or not os.path.exists(part):
        Path(part).unlink(missing_ok=True)
        raise RuntimeError(f"convert_hf_to_gguf.py exited with {rc}:\n{_tail(logfile)}")
    os.replace(part, gguf)
    seconds = time.perf_counter() - t0
    log(f"llama.cpp: converted in {seconds:.0f}s ({os.path.getsize(gguf) / GIB:.2f} GiB)")
    return {"seconds": round(seconds, 1), "gguf_bytes": os.path.getsize(gguf)} | gguf_summary(src, gguf)


def gguf_summary(src: str, path: str) -> dict:
    """Tensor types of a GGUF (histogram; the expert tensors' types by name) and a few metadata keys."""
    sys.path.insert(0, os.path.join(src, "gguf-py"))
    try:
        from gguf import GGUFReader
    finally:
        sys.path.pop(0)
    reader = GGUFReader(path)
    hist: dict[str, int] = {}
    experts: dict[str, list[str]] = {}
    for t in reader.tensors:
        kind = t.tensor_type.name
        hist[kind] = hist.get(kind, 0) + 1
        if "_exps.weight" in t.name:  # ffn_{gate,up,down}_exps
            experts.setdefault(t.name.split(".")[-2], []).append(kind)
    meta = {}
    for key in ("general.architecture", "general.file_type", "tokenizer.ggml.pre", "gpt-oss.expert_count",
                "gpt-oss.expert_used_count", "gpt-oss.block_count"):
        field = reader.fields.get(key)
        if field is not None:
            meta[key] = field.contents()
    return {"tensor_types": hist, "expert_types": {k: sorted(set(v)) for k, v in experts.items()},
            "experts_mxfp4": bool(experts) and all(set(v) == {"MXFP4"} for v in experts.values()), "metadata": meta}


def _run_measured(cmd: list[str], logfile: str, timeout: float) -> tuple[int | str, str, dict]:
    """Runs cmd (stderr to logfile); returns (exit code or "timeout", stdout, {wall_s, peak_rss_bytes}).

    Reaped with wait4, which gives this child's own peak RSS (ru_maxrss of RUSAGE_CHILDREN is a max over all)."""
    with open(logfile, "w") as lf, tempfile.TemporaryFile("w+") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=lf)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - t0 > timeout:
                proc.kill()
                os.wait4(proc.pid, 0)
                proc.returncode = -9
                return "timeout", "", {"wall_s": round(time.perf_counter() - t0, 2)}
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        return proc.returncode, out.read(), {"wall_s": round(time.perf_counter() - t0, 2),
                                             "peak_rss_bytes": usage.ru_maxrss * 1024}


def run_llama_bench(llama: dict, gguf: str, args, logfile: str) -> dict:
    """llama-bench -p P -n N -t T -r runs -o json: pp (prefill) and tg (decode) tokens/s, plus its peak RSS."""
    cmd = [llama["bench"], "-m", gguf, "-p", str(args.prompt), "-n", str(args.new), "-t", str(args.threads),
           "-r", str(args.runs), "-o", "json"]
    log(f"llama.cpp: {' '.join(cmd[1:])}")
    rc, stdout, stats = _run_measured(cmd, logfile, timeout=3600)
    if rc != 0:
        return {"error": f"llama-bench exited with {rc}: {_tail(logfile, 800)}", "cmd": cmd} | stats
    res: dict = {"cmd": cmd} | stats
    for entry in json.loads(stdout):
        test = "prefill" if entry["n_gen"] == 0 else "decode"
        res[test] = {"tok_s": entry["avg_ts"], "stddev_tok_s": entry["stddev_ts"],
                     "best_tok_s": max(entry["samples_ts"]), "samples_tok_s": entry["samples_ts"],
                     "n_prompt": entry["n_prompt"], "n_gen": entry["n_gen"]}
        res["info"] = {k: entry.get(k) for k in ("build_commit", "build_number", "cpu_info", "backends", "model_type",
                                                  "model_size", "model_n_params", "n_threads", "n_batch", "n_ubatch",
                                                  "flash_attn", "type_k", "type_v", "repack")}
    res["loadavg1"] = os.getloadavg()[0]
    log(f"llama.cpp: prefill {res['prefill']['tok_s']:.1f} tok/s, decode {res['decode']['tok_s']:.2f} tok/s")
    return res


def run_llama_simple(llama: dict, gguf: str, logfile: str) -> dict:
    """Greedy continuation of CHECK_TEXT by llama-simple (it prints the prompt, then the new tokens' text)."""
    if not llama.get("simple") or not os.path.exists(llama["simple"]):
        return {"error": "no llama-simple next to llama-bench"}
    rc, stdout, stats = _run_measured([llama["simple"], "-m", gguf, "-n", str(CHECK_NEW), CHECK_TEXT], logfile, 600)
    if rc != 0:
        return {"error": f"llama-simple exited with {rc}: {_tail(logfile, 800)}"}
    text = stdout[:-1] if stdout.endswith("\n") else stdout
    return {"text": text[len(CHECK_TEXT):] if text.startswith(CHECK_TEXT) else text,
            "prompt_roundtrip": text.startswith(CHECK_TEXT)} | stats


# ---------------------------------------------------------------------------------------------- gptoss child
def child_ours(spec: dict) -> dict:
    cpus = sorted(os.sched_getaffinity(0))[: spec["threads"]]
    os.sched_setaffinity(0, cpus)  # before jax starts its thread pools: T cores, as llama-bench -t T
    import gptoss
    from gptoss.engine import generate
    from gptoss.tokenizer import load_tokenizer

    t0 = time.perf_counter()
    model = gptoss.from_pretrained(spec["ckpt"], dtype="bfloat16", progress=False)
    gptoss.pack_dense(model, spec.get("dense_weights", "auto"))  # as `gptoss generate` does by default
    from gptoss.model.packing import dense_format

    res: dict = {"load_s": time.perf_counter() - t0, "kernel": kernel_state(), "cpus": cpus,
                 "dense_weights": dense_format(model)}

    def run(prompts, n, stamps=None):
        t0 = time.perf_counter()
        clock = (lambda _: stamps.append(time.perf_counter())) if stamps is not None else False
        out = generate(model, prompts, max_new_tokens=n, stop_tokens=[], progress=clock)
        return time.perf_counter() - t0, out.tokens

    P, N = spec["prompt"], spec["new"]
    prompts = prompts_for(1, P, model.config.vocab_size)

    def timed(runs):
        """prefill: the median time to the first token; decode: N x the median time between decode steps, from
        generate's per-step progress callback (a host callback per step, ~0.1 ms), over all steps of `runs` full
        runs. The prefill's report is not used: it does not wait for the prefill (no data dependence). A difference
        of whole runs (1 + N tokens minus 1) carried the prefill's run-to-run noise into the decode figure."""
        ttfts = [run(prompts, 1)[0] for _ in range(runs)]
        steps = []
        for _ in range(runs):
            stamps: list[float] = []
            run(prompts, N + 1, stamps)
            assert len(stamps) == N + 1, f"{len(stamps)} progress reports for {N + 1} tokens"
            steps += [b - a for a, b in zip(stamps[1:], stamps[2:])]
        return sorted(ttfts)[runs // 2], N * sorted(steps)[len(steps) // 2], ttfts, steps

    log("gptoss: warm-up (compiles)")
    run(prompts, 1)
    run(prompts, N + 1, [])
    if spec.get("paired_once"):  # one paired window in a fresh process (the reload rounds, `paired_reload`)
        import numpy as np
        from decode import probe_step_s

        rng = np.random.default_rng()
        before = 1 / probe_step_s(model, rng)[0]
        tok_s = N / timed(2)[1]
        return res | {"gptoss_tok_s": tok_s, "roofline_tok_s": [before, 1 / probe_step_s(model, rng)[0]]}
    ttft, decode_s, ttfts, steps = timed(spec["runs"])
    res["prefill"] = {"tok_s": P / ttft, "ttft_s": ttft, "ttft_runs_s": ttfts}
    res["decode"] = {"tok_s": N / decode_s, "decode_s": decode_s, "step_s": steps,
                     "timing": "N x the median time between decode steps (generate's progress callback)"}
    res["loadavg1"] = os.getloadavg()[0]  # a shared machine: other load slows either side
    log(f"gptoss: prefill {res['prefill']['tok_s']:.1f} tok/s, decode {res['decode']['tok_s']:.2f} tok/s")
    if spec.get("paired"):
        import numpy as np
        from decode import probe_step_s

        rng = np.random.default_rng(0)

        def decode_tok_s():
            return N / timed(2)[1]

        def roofline_tok_s():
            return 1 / probe_step_s(model, rng)[0]

        res["paired"] = paired_decode(spec.get("paired_cmd"), spec["paired"], decode_tok_s, roofline_tok_s)
    res["check"] = greedy_check(model, generate, load_tokenizer(), spec.get("llama_text"))
    return res


def _median(values: list[float]) -> float:
    v = sorted(values)
    return (v[(len(v) - 1) // 2] + v[len(v) // 2]) / 2


STEADY = 1.1  # a side's window is steady when the roofline before and after it, and its share, stay below this


def _share(tok_s: float, before: float, after: float) -> tuple[float, bool]:
    """A side's tok/s over the roofline's mean around it, and whether its window was steady: the roofline held
    within 10 %, and the side did not beat it by 10 % (no read is faster than the roofline's: the phase swung and
    back during the window)."""
    share = tok_s / ((before + after) / 2)
    return share, max(before, after) / min(before, after) < STEADY and share < STEADY


def paired_decode(cmd: list[str] | None, rounds: int, ours, roofline, *, ours_probes: bool = False) -> dict:
    """Decode tok/s of llama-bench (decode only, best of its runs; when `cmd`) and of ours, each between two
    measurements of the roofline (one step's weight bytes read with no compute, `decode.probe_step_s`), `rounds`
    times while this process keeps its model. A shared machine's read rate can swing 2x within seconds, so a ratio
    of two runs even seconds apart can measure the machine: each side's share of the roofline around it (its
    tok/s over the roofline's mean before and after) corrects for that, and is trusted in the rounds where the
    roofline held within 10 % across both sides' windows and neither side beat it by 10 % ("steady"); the ratio of
    the two shares is the phase-corrected speed ratio. `ours_probes`: `ours()` returns its tok/s and the roofline it
    measured just before and after (a process of its own per round: `paired_reload`)."""
    out: list[dict] = []
    for i in range(rounds):
        row: dict = {"roofline_tok_s": [roofline()]}
        if cmd:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
            if proc.returncode != 0:
                return {"error": f"llama-bench exited with {proc.returncode}: {proc.stderr[-800:]}", "rounds": out}
            row["llama_tok_s"] = max(json.loads(proc.stdout)[0]["samples_ts"])
            row["roofline_tok_s"].append(roofline())
        if ours_probes:
            row["gptoss_tok_s"], around = ours()
            row["roofline_tok_s"] += around
        else:
            row["gptoss_tok_s"] = ours()
            row["roofline_tok_s"].append(roofline())
        r = row["roofline_tok_s"]
        row["of_roofline"], row["steady"] = _share(row["gptoss_tok_s"], r[-2], r[-1])
        line = f"paired round {i}: gptoss {row['gptoss_tok_s']:.2f} tok/s ({row['of_roofline']:.2f} of the roofline"
        if cmd:
            row["ratio"] = row["gptoss_tok_s"] / row["llama_tok_s"]
            row["llama_of_roofline"], steady = _share(row["llama_tok_s"], r[0], r[1])
            row["steady"] = row["steady"] and steady
            row["share_ratio"] = row["of_roofline"] / row["llama_of_roofline"]
            line += (f"), llama.cpp {row['llama_tok_s']:.2f} ({row['llama_of_roofline']:.2f}): {row['ratio']:.3f}x, "
                     f"shares {row['share_ratio']:.3f}x")
        else:
            line += ")"
        log(line + "; roofline " + " / ".join(f"{v:.2f}" for v in r) + ("" if row["steady"] else " (not steady)"))
        out.append(row)
    steady = [r for r in out if r["steady"]]
    res = {"rounds": out, "steady_rounds": len(steady), "cmd": cmd,
           "median_of_roofline": _median([r["of_roofline"] for r in steady or out])}
    if cmd:
        res["median_ratio"] = _median([r["ratio"] for r in out])
        res["median_llama_of_roofline"] = _median([r["llama_of_roofline"] for r in steady or out])
        res["median_share_ratio"] = _median([r["share_ratio"] for r in steady]) if steady else None
    return res


def _read_through(path: str, chunk: int = 64 << 20) -> None:
    """Reads a file once, into the page cache."""
    buf = bytearray(chunk)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def paired_reload(cmd: list[str], rounds: int, cfg, threads: int, script: str, spec: dict) -> dict:
    """`paired_decode` where the two models do not fit in memory together (the 20b shape in 24 GiB): each round runs
    llama-bench between two reads of a synthetic copy of one step's weight bytes (`decode.synthetic_read_set`, held
    by this process only during llama.cpp's window), then a fresh gptoss process that loads the model and times its
    decode between two reads of its own weights. The GGUF is read through the page cache before llama.cpp's first
    roofline read, so its load (a mmap) stays short inside the window; ours loads before its window."""
    import gc

    import numpy as np
    from decode import probe_runs_s, synthetic_read_set

    from gptoss.kernels import mxfp4_cpu

    mxfp4_cpu.set_num_threads(threads)  # as many pool threads as each side runs on
    rng, held = np.random.default_rng(), {}
    gguf = cmd[cmd.index("-m") + 1]
    dense = spec.pop("dense_format", "bf16")  # what our side's weights are (the roofline reads our step's bytes)

    def roofline() -> float:
        if "runs" not in held:  # before llama.cpp's window
            _read_through(gguf)
            held["runs"] = synthetic_read_set(cfg, rng, dense=dense)
        return 1 / probe_runs_s(held["runs"])[0]

    def ours() -> tuple[float, list[float]]:
        held.clear()
        gc.collect()  # the synthetic weights go before our model loads
        res = run_child(script, spec | {"paired_once": True}, timeout=1800)
        if "error" in res:
            raise RuntimeError(f"gptoss's round failed: {res['error']}")
        return res["gptoss_tok_s"], res["roofline_tok_s"]

    try:
        out = paired_decode(cmd, rounds, ours, roofline, ours_probes=True)
    except RuntimeError as e:
        return {"error": str(e)}
    return out | {"reload": "a fresh gptoss process per round; llama.cpp's roofline from a synthetic read set"}


def greedy_check(model, generate, tok, llama_text: str | None) -> dict:
    """Ours' greedy continuation of CHECK_TEXT, and llama.cpp's (re-encoded from its text) teacher-forced through
    ours: at how many of its positions is llama.cpp's token ours' top-1, and the logit gaps where not. A free-run
    text match alone says little: with random weights the top two logits are often within bf16 rounding."""
    import numpy as np

    ids = tok.encode_ordinary(CHECK_TEXT)
    n = len(ids)
    new = generate(model, [ids], max_new_tokens=CHECK_NEW, stop_tokens=[]).tokens[0]
    logits = np.asarray(model(np.array([ids + new], np.int32))[0, n - 1:-1])
    top2 = np.sort(logits, axis=-1)[:, -2:]
    out: dict = {"prompt_tokens": n, "tokens": new, "text": tok.decode(new),
                 "top2_gap": [round(float(g), 4) for g in top2[:, 1] - top2[:, 0]]}
    if llama_text is None:
        return out
    full = tok.encode(CHECK_TEXT + llama_text, allowed_special="all")
    if full[:n] != ids:
        return out | {"llama_reencode": "the prompt tokens change when llama.cpp's text is appended"}
    forced = full[n:]
    logits = np.asarray(model(np.array([full], np.int32))[0, n - 1:-1])
    mine = logits.argmax(-1)
    gaps = [float(logits[i, mine[i]] - logits[i, t]) for i, t in enumerate(forced)]
    return out | {"llama_tokens": forced, "llama_top1_agreement": float(np.mean(mine == np.array(forced))),
                  "llama_logit_gap": [round(g, 4) for g in gaps]}


def child_main(spec: dict) -> None:
    child_finish(spec, child_ours(spec))


# ---------------------------------------------------------------------------------------------- parent
def available_memory() -> int:
    """MemAvailable of /proc/meminfo in bytes (0 where unknown: then nothing is run that needs it)."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return 0


def isa_flags() -> list[str]:
    """The SIMD/matrix flags of /proc/cpuinfo (what GGML_NATIVE and gptoss's kernels can use)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line.split(":", 1)[1].split() for line in f if line.startswith("flags"))
    except (OSError, StopIteration):
        return []
    keep = ("sse4", "ssse3", "avx", "fma", "f16c", "bmi", "amx", "sve", "neon", "asimd")
    return sorted(f for f in flags if f.startswith(keep))


def shape_plan(args) -> list[tuple[str, int, str]]:
    """(name, layers, checkpoint fill) per checkpoint; the 20b one is tiled (writing 12.8 GiB of random is slow)."""
    plan = [(f"{args.layers}L", args.layers, "random")]
    if args.shape_20b:
        plan.append(("20b", 24, "tiled"))
    return plan


def _same_config(folder: str, cfg) -> bool:
    try:
        with open(os.path.join(folder, "config.json")) as f:
            return {k: v for k, v in json.load(f).items() if k in cfg.to_hf()} == cfg.to_hf()
    except (OSError, ValueError):
        return False


def run_shape(name: str, layers: int, fill: str, args, llama: dict | None, work: str, script: str) -> dict:
    from _common import checkpoint_tensors, tensor_nbytes

    cfg = bench_config(layers)
    res: dict = {"layers": layers, "fill": fill}
    ckpt, gguf = os.path.join(work, f"ckpt-{name}"), os.path.join(work, f"ckpt-{name}.gguf")
    ckpt_bytes = sum(tensor_nbytes(c, s) for _, c, s in checkpoint_tensors(cfg))
    reuse_ckpt = _same_config(ckpt, cfg)
    need = (0 if reuse_ckpt else ckpt_bytes) + (ckpt_bytes if llama and not os.path.exists(gguf) else 0)
    free = shutil.disk_usage(work).free
    res["disk"] = {"checkpoint_bytes": ckpt_bytes, "free_bytes": free, "need_bytes": need}
    if free < need + 2 * GIB:
        res["error"] = f"not enough free disk in {work}: {free / GIB:.1f} GiB, need {need / GIB + 2:.1f} GiB"
        log(f"{name}: {res['error']}")
        return res
    if reuse_ckpt:
        log(f"{name}: reusing the checkpoint in {ckpt}")
    else:
        log(f"{name}: writing the synthetic checkpoint ({ckpt_bytes / GIB:.1f} GiB, fill {fill})")
        res["checkpoint"] = write_synthetic_hf_mxfp4(ckpt, cfg, fill=fill, n_shards=max(1, round(ckpt_bytes / 5e9)),
                                                     seed=0)
    if llama:
        try:
            res["tokenizer"] = write_tokenizer(ckpt)
            if os.path.exists(gguf):
                res["convert"] = {"reused": True, "gguf_bytes": os.path.getsize(gguf),
                                  **gguf_summary(llama["src"], gguf)}
            else:
                res["convert"] = convert(llama, ckpt, gguf, os.path.join(work, f"convert-{name}.log"))
            if not res["convert"]["experts_mxfp4"]:
                log(f"{name}: WARNING: expert tensors are not all MXFP4: {res['convert']['expert_types']}")
            res["llama"] = run_llama_bench(llama, gguf, args, os.path.join(work, f"bench-{name}.log"))
            res["llama_check"] = run_llama_simple(llama, gguf, os.path.join(work, f"simple-{name}.log"))
        except (OSError, ImportError, ValueError, RuntimeError, KeyError) as e:  # the llama.cpp side is optional
            res["llama"] = {"error": f"{type(e).__name__}: {e}"}
            log(f"{name}: llama.cpp side failed: {e}")
        if not args.keep and not args.paired:
            Path(gguf).unlink(missing_ok=True)  # disk: the 20b GGUF is ~13 GiB (--paired needs it until the end)
    reload_rounds = None  # llama-bench's command where paired rounds reload gptoss (`paired_reload`)
    if not args.skip_ours:
        spec = {"ckpt": ckpt, "prompt": args.prompt, "new": args.new, "runs": args.runs, "threads": args.threads,
                "dense_weights": args.dense_weights,
                "llama_text": res.get("llama_check", {}).get("text"), "out": os.path.join(work, f"ours-{name}.json")}
        if args.paired:
            # both models resident at once where they fit (ours in memory, llama.cpp's GGUF mapped), else reloads
            need, avail = 2 * ckpt_bytes, available_memory()
            cmd = [llama["bench"], "-m", gguf, "-p", "0", "-n", str(args.new), "-t", str(args.threads), "-r", "2",
                   "-o", "json"] if llama else None
            if not (llama and os.path.exists(gguf) and "error" not in res.get("llama", {})):
                res["paired_llama"] = "no llama.cpp decode to pair with (skipped, or see its error)"
                spec["paired"] = args.paired  # ours and the roofline only
                log(f"{name}: rounds without llama.cpp: {res['paired_llama']}")
            elif need > 0.9 * avail:
                log(f"{name}: both models need ~{need / GIB:.1f} GiB, {avail / GIB:.1f} GiB available: "
                    "paired rounds reload gptoss each round")
                reload_rounds = cmd
            else:
                spec["paired"], spec["paired_cmd"] = args.paired, cmd
        log(f"{name}: gptoss side (own process)")
        res["gptoss"] = run_child(script, spec, timeout=3600)
        if reload_rounds:
            res["paired"] = paired_reload(reload_rounds, args.paired, cfg, args.threads, script,
                                          {k: spec[k] for k in ("ckpt", "prompt", "new", "threads", "dense_weights")}
                                          | {"out": os.path.join(work, f"ours-{name}-round.json"),
                                             "dense_format": res["gptoss"].get("dense_weights", "bf16")})
    if "paired" in res.get("gptoss", {}):
        res["paired"] = res["gptoss"].pop("paired")
    for path in ([] if args.keep else [ckpt, gguf]):
        shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else Path(path).unlink(missing_ok=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--shape-20b", action="store_true", help="also the 24-layer gpt-oss-20b shape (~26 GiB of disk)")
    ap.add_argument("--threads", type=int, default=2, help="llama-bench -t; gptoss is pinned to as many cores")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens (prefill)")
    ap.add_argument("--new", type=int, default=32, help="decode steps timed")
    ap.add_argument("--runs", type=int, default=3,
                    help="repetitions per measurement (llama-bench: mean; gptoss: median, see child_ours)")
    ap.add_argument("--quick", action="store_true", help="2 layers, prompt 32, 8 tokens: a smoke run")
    ap.add_argument("--paired", type=int, default=0, metavar="R",
                    help="also R rounds of decode alternating llama-bench, gptoss and the roofline (a step's weight "
                         "bytes read with no compute); where both models do not fit in RAM, gptoss reloads per round")
    ap.add_argument("--skip-ours", action="store_true")
    ap.add_argument("--skip-llama", action="store_true")
    ap.add_argument("--llama-bench", help="a llama-bench binary (else $LLAMA_BENCH, PATH, or a cached build)")
    ap.add_argument("--llama-src", help="llama.cpp sources for the converter (else $LLAMA_CPP_SRC or the sdist's)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel jobs of the llama.cpp build")
    ap.add_argument("--keep", metavar="DIR", help="write (and reuse) checkpoints and GGUFs in DIR, keep them")
    ap.add_argument("--no-amx", action="store_true",
                    help="deny AMX to every side (seccomp; _common.deny_amx): an AMX Xeon as a CPU without AMX")
    ap.add_argument("--gemv-input", choices=("x16", "x8", "exact"),
                    help="gptoss's one-token MXFP4 GEMV input (GPTOSS_MXFP4_GEMV_INPUT; default: the library's, x16); "
                         "x8 rounds x per 32 elements to 8 bits as llama.cpp's Q8_0 does")
    ap.add_argument("--dense-weights", choices=("auto", "bf16", "bf12"), default="auto",
                    help="gptoss's attention and unembedding weights (gptoss.pack_dense; default auto, as `gptoss "
                         "generate`: bf12 where the CPU decodes it in registers)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child_main(json.loads(args.child))
    if args.no_amx:
        deny_amx()  # inherited by the children: both sides
    if args.gemv_input:
        os.environ["GPTOSS_MXFP4_GEMV_INPUT"] = args.gemv_input  # read by our side's child at library load
    if args.quick:
        args.layers, args.prompt, args.new = 2, 32, 8
    interrupt_on_sigterm()
    out: dict = {"benchmark": "llama_cpp", "machine": machine_info() | {"isa_flags": isa_flags()},
                 "threads": args.threads, "prompt": args.prompt, "new": args.new, "runs": args.runs, "shapes": {},
                 "amx_denied": args.no_amx, "gemv_input": args.gemv_input, "dense_weights": args.dense_weights}
    out["read_gbps"] = stream_read_gbps()
    log(f"numpy streaming read: {out['read_gbps']:.1f} GB/s")
    llama = None
    if args.skip_llama:
        out["llama_cpp"] = {"skipped": "--skip-llama"}
    else:
        try:
            llama = find_llama(args)
            out["llama_cpp"] = llama
        except (Unavailable, OSError, tarfile.TarError) as e:
            print(f"llama.cpp side skipped: {e}", flush=True)
            out["llama_cpp"] = {"skipped": str(e)}
    if args.keep:
        os.makedirs(args.keep, exist_ok=True)
    work = args.keep or tempfile.mkdtemp(prefix="gptoss-bench-llama-", dir="/tmp")
    try:
        for name, layers, fill in shape_plan(args):
            out["shapes"][name] = run_shape(name, layers, fill, args, llama, work, os.path.abspath(__file__))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report(out)
    path = write_json(("llama_cpp_quick" if args.quick else "llama_cpp") + ("_noamx" if args.no_amx else "")
                      + (f"_{args.gemv_input}" if args.gemv_input else "")
                      + (f"_{args.dense_weights}" if args.dense_weights != "auto" else ""), out)
    log(f"wrote {path}")


def report(out: dict) -> None:
    from decode import step_bytes

    rows, checks = [], []
    for name, r in out["shapes"].items():
        if "error" in r:
            rows.append([name, r["error"]])
            continue
        nbytes = step_bytes(bench_config(r["layers"]), 1, "ours", 2)  # both: MXFP4 experts, bf16 rest
        r["decode_step_bytes"] = nbytes
        sides = {"gptoss": r.get("gptoss"), "llama.cpp": r.get("llama")}
        for side, s in sides.items():
            if s is None:
                continue
            if "error" in s:
                rows.append([name, side, s["error"].splitlines()[0][:100]])
                continue
            pre = s["prefill"].get("best_tok_s", s["prefill"]["tok_s"])
            dec = s["decode"].get("best_tok_s", s["decode"]["tok_s"])
            s["decode"]["read_fraction"] = nbytes * dec / 1e9 / out["read_gbps"]
            rss = s.get("peak_rss_bytes")
            rows.append([name, side, pre, dec, 1000 / dec, 100 * s["decode"]["read_fraction"],
                         None if rss is None else rss / GIB, s.get("loadavg1")])
        ours, theirs = sides["gptoss"], sides["llama.cpp"]
        if ours and theirs and "error" not in ours and "error" not in theirs:
            r["ratio"] = {k: ours[k]["tok_s"] / theirs[k]["best_tok_s"] for k in ("prefill", "decode")}
            rows.append([name, "gptoss / llama.cpp", f"{r['ratio']['prefill']:.2f}x", f"{r['ratio']['decode']:.2f}x"])
        mine, other = (ours or {}).get("check"), r.get("llama_check")
        if mine and other and "text" in other:
            r["greedy_same_text"] = mine["text"] == other["text"]
            checks.append(f"{name}: greedy {CHECK_NEW} tokens: gptoss {mine['text']!r}, llama.cpp {other['text']!r} "
                          f"(same: {r['greedy_same_text']}; ours' top-2 gaps {mine['top2_gap']})")
            if "llama_top1_agreement" in mine:
                checks.append(f"{name}: llama.cpp's tokens teacher-forced through gptoss: top-1 agreement "
                              f"{100 * mine['llama_top1_agreement']:.0f}%, logit gaps {mine['llama_logit_gap']}")
            elif "llama_reencode" in mine:
                checks.append(f"{name}: {mine['llama_reencode']}")
        paired = r.get("paired")
        if paired and "error" not in paired:
            rounds, n = paired["rounds"], paired["steady_rounds"]
            over = "the steady rounds" if n else "all rounds (none steady)"
            line = (f"{name}: paired decode, {len(rounds)} rounds, {n} steady: gptoss at "
                    f"{paired['median_of_roofline']:.2f} of the roofline (median over {over}")
            if "median_ratio" in paired:
                line += f"), llama.cpp at {paired['median_llama_of_roofline']:.2f}"
                if paired["median_share_ratio"] is not None:
                    line += f"; phase-corrected gptoss / llama.cpp {paired['median_share_ratio']:.2f}x"
                line += ("; raw per-round ratios " + ", ".join(f"{p['ratio']:.2f}" for p in rounds)
                         + f" (median {paired['median_ratio']:.2f}x)")
                if "reload" in paired:
                    line += " (gptoss reloaded per round)"
            else:
                line += f"); llama.cpp not paired: {r.get('paired_llama')}"
            checks.append(line)
        elif paired:
            checks.append(f"{name}: paired decode: {paired['error']}")
    print_table(f"gptoss vs llama.cpp, CPU, batch 1, {out['threads']} threads, prompt {out['prompt']}, decode "
                f"{out['new']} tokens, {out['runs']} runs (llama-bench: mean; gptoss: median); "
                f"read bandwidth {out['read_gbps']:.1f} GB/s"
                + ("; AMX denied (--no-amx)" if out.get("amx_denied") else "")
                + (f"; gptoss GEMV input {out['gemv_input']}" if out.get("gemv_input") else "")
                + f"; gptoss dense weights {out.get('dense_weights', 'bf16')}",
                ["shape", "side", "prefill tok/s", "decode tok/s", "ms/token", "% read bw", "peak RSS GiB", "load"],
                rows)
    print("% read bw: decode weight bytes/s over the 1-thread numpy read bandwidth (2 threads can pass 100%); load: "
          "1-min load average after the side ran (llama.cpp's decode slows ~10x when other processes hold the cores)")
    for line in checks:
        print(line)


if __name__ == "__main__":
    main()
