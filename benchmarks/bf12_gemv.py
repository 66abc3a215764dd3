"""A prototype's speed: one-token GEMV over a bf16 weight read as bf16, or as bf12 (a lossless 12.25-bit form of the
same weights), on the unembedding's shape (201088 x 2880), cold, the variants in random order per round.

Both gptoss and llama.cpp read the same bytes per decode token, so where the memory is the limit neither can lead;
bf12 reads 77 % of the bytes for the same weights (benchmarks/RESULTS.md, "A lossless 12-bit form of the bf16
weights"). `bf12_gemv.cc` is standalone (not the library): built here with the C++ compiler for this CPU (needs
AVX512_BF16 and AVX512_VBMI; skipped with a message otherwise). Prints a table, writes results/bf12_gemv.json.

    .venv/bin/python benchmarks/bf12_gemv.py [--rows 201088] [--rounds 60] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
from _common import log, machine_info, print_table, write_json

HERE = os.path.dirname(os.path.abspath(__file__))


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next(line.split(":", 1)[1].split() for line in f if line.startswith("flags")))
    except (OSError, StopIteration):
        return set()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=201088)
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    missing = {"avx512_bf16", "avx512vbmi"} - cpu_flags()
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if missing or cxx is None:
        print(f"bf12_gemv skipped: {'this CPU lacks ' + ', '.join(sorted(missing)) if missing else 'no C++ compiler'}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        exe = os.path.join(tmp, "bf12_gemv")
        subprocess.run([cxx, "-O3", "-march=native", "-std=c++17", "-pthread", os.path.join(HERE, "bf12_gemv.cc"),
                        "-o", exe], check=True)
        log(f"{args.rows} rows x 2880, {args.rounds} rounds, {args.threads} threads")
        proc = subprocess.run([exe, str(args.rows), str(args.rounds), str(args.threads)], capture_output=True,
                              text=True, check=True)
    res = json.loads(proc.stdout)
    t = {k: np.array(v) for k, v in res["seconds"].items()}
    fast = np.argsort(t["bf16"])[: max(1, args.rounds // 10)]  # the fastest tenth of bf16's rounds: a fast phase
    rows = []
    for name, nbytes in (("bf16", res["bf16_bytes"]), ("bf12", res["packed_bytes"]), ("plain", res["packed_bytes"])):
        ratio = t["bf16"] / t[name]
        rows.append([name, nbytes / 1e6, 1e3 * np.median(t[name]), nbytes / np.median(t[name]) / 1e9,
                     np.median(ratio), np.percentile(ratio, 10), np.percentile(ratio, 90), np.median(ratio[fast]),
                     res["exceptions"].get(name, 0)])
    print_table(f"one-token GEMV, {res['N']} x {res['K']}, {res['threads']} threads, cold, {res['rounds']} rounds in "
                "random order (bf12: table decode; plain: the same information decoded with shifts)",
                ["form", "MB", "median ms", "GB/s read", "bf16 / it", "p10", "p90", "fast tenth", "exceptions"], rows)
    print(f"max |y - y_bf16|: bf12 {res['max_abs_diff']['bf12']:.3g}, plain {res['max_abs_diff']['plain']:.3g} "
          f"(exceptions decoded as zero; max |y| {res['max_abs_y']:.3g})")
    out = {"benchmark": "bf12_gemv", "machine": machine_info(), **res,
           "table": {r[0]: dict(zip(["mb", "median_ms", "gbps", "speedup", "p10", "p90", "fast_tenth"], r[1:8]))
                     for r in rows}}
    log(f"wrote {write_json('bf12_gemv', out)}")


if __name__ == "__main__":
    sys.exit(main())
