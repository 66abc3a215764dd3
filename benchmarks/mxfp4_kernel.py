"""MXFP4 CPU kernel benchmark: packed bytes/s of the routed-expert GEMV at gpt-oss's real shapes.

Decode reads each selected expert's packed weights once per token, so its speed limit is memory bandwidth.
This measures, interleaved round by round so that all see the same machine load:
  * numpy streaming read (`uint8 .max()` over a buffer larger than the weights): the roofline;
  * the kernel, jitted (gptoss.kernels.mx_gather_matmul: the XLA FFI call the MoE layer uses) and called
    directly through ctypes (no XLA dispatch), for the 4-expert GEMV (1 token, top-4) of gate_up [5760, 2880]
    and down [2880, 2880], with the experts drawn at random from --experts so that they are not cache-hot;
  * the pure-XLA dequantize + einsum path (what moe_gather does without the kernel), a few rounds;
  * prefill: 128 tokens x top-4 on gate_up (bf16 inputs), kernel grouped on every path the CPU has (AMX tiles,
    VDPBF16PS tiles, the AVX-512 FMA path) vs gather (GFLOP/s), and XLA's fp32 and bf16 GEMMs of the same FLOPs
    as compute references.
Bytes counted: packed blocks + scales of the 4 experts (4.25 bits per weight).

    .venv/bin/python benchmarks/mxfp4_kernel.py            # 32 experts, 15 rounds
    .venv/bin/python benchmarks/mxfp4_kernel.py --quick    # 12 experts, 6 rounds

Writes benchmarks/results/mxfp4_kernel.json. Not a test.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from _common import bandwidth_summary, log, machine_info, print_table, write_json

from gptoss.kernels import mxfp4_cpu
from gptoss.quant import MXFP4Array

SHAPES = {"gate_up": (5760, 2880), "down": (2880, 2880)}
TOPK = 4


def packed(rng, E, N, K):
    blocks = rng.integers(0, 256, (E, N, K // 32, 16), dtype=np.uint8)
    scales = rng.integers(118, 131, (E, N, K // 32), dtype=np.uint8)
    return blocks, scales


def stream_read(buf: np.ndarray) -> float:
    t = time.perf_counter()
    buf.max()  # a vectorized uint8 reduction: as fast as any numpy read tried (f64/i64 sum, u64 max, or)
    return time.perf_counter() - t


def timed(fn, *args) -> float:
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--xla-rounds", type=int, default=3)
    ap.add_argument("--prefill-tokens", type=int, default=128)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.experts, args.rounds, args.xla_rounds, args.prefill_tokens = 12, 6, 2, 64
    if not mxfp4_cpu.kernel_available():
        raise SystemExit(f"the MXFP4 CPU kernel is unavailable: {mxfp4_cpu.load_error()}")

    rng = np.random.default_rng(0)
    E = args.experts
    log(f"generating {E} random experts per shape")
    weights = {}
    for name, (N, K) in SHAPES.items():
        b, s = packed(rng, E, N, K)
        weights[name] = (b.nbytes + s.nbytes, MXFP4Array(jnp.asarray(b), jnp.asarray(s), jnp.bfloat16))
        del b, s
    total = sum(nbytes for nbytes, _ in weights.values())
    buf = np.ones(max(total, 1 << 29), np.uint8)  # the roofline reads at least 512 MiB, more than the weights
    x32 = rng.normal(size=(1, 2880)).astype(np.float32)
    xbf = jnp.asarray(x32, jnp.bfloat16)
    threads_default = mxfp4_cpu.set_num_threads(0)

    kernel = jax.jit(lambda x, w, i: mxfp4_cpu.mx_gather_matmul(x, w, i))
    lib = mxfp4_cpu.load_library()

    def raw(name, idx):  # the same (XLA-owned) weight buffers the jitted call reads
        b, s = (np.asarray(a) for a in (weights[name][1].blocks, weights[name][1].scales))
        N, K = SHAPES[name]
        y = np.empty((1, TOPK, N), np.float32)
        rc = lib.gptoss_mxfp4_matmul(x32.ctypes.data, 0, b.ctypes.data, s.ctypes.data, idx.ctypes.data,
                                     y.ctypes.data, 1, K, E, N, TOPK, 0)
        assert rc == 0

    @jax.jit
    def xla_path(x, w, idx):  # moe_gather without the kernel: gather packed experts, dequantize, einsum
        wd = w.take(idx.reshape(-1)).dequantize(x.dtype)
        return jnp.einsum("d,afd->af", x[0], wd, preferred_element_type=jnp.float32)

    def experts():
        return rng.choice(E, TOPK, replace=False).astype(np.int32).reshape(1, TOPK)

    log("warm-up (compiles)")
    for name in SHAPES:
        w = weights[name][1]
        jax.block_until_ready(kernel(xbf, w, experts()))
        jax.block_until_ready(kernel(x32, w, experts()))
        jax.block_until_ready(xla_path(xbf, w, experts()))
    stream_read(buf)

    times: dict[str, list[float]] = {}

    def record(key, fn, *fn_args):
        times.setdefault(key, []).append(timed(fn, *fn_args))

    configs = [(1, "1 thread"), (threads_default, f"{threads_default} threads")]
    variants = [(n, tlabel, name, how) for n, tlabel in configs for name in SHAPES
                for how in ("jit bf16 x", "jit f32 x", "ctypes f32 x")]
    log(f"{args.rounds} interleaved rounds")
    for r in range(args.rounds):
        times.setdefault("numpy read", []).append(stream_read(buf))
        for k in rng.permutation(len(variants)):  # a new order each round: no variant always runs first
            n_threads, tlabel, name, how = variants[k]
            mxfp4_cpu.set_num_threads(n_threads)  # (a no-op unless the size changes)
            w, key = weights[name][1], f"kernel {how}|{name}|{tlabel}"
            if how == "ctypes f32 x":
                record(key, raw, name, experts())
            else:
                record(key, kernel, xbf if how == "jit bf16 x" else x32, w, experts())
        mxfp4_cpu.set_num_threads(0)
        if r < args.xla_rounds:
            for name in SHAPES:
                record(f"pure XLA bf16 x|{name}|XLA threads", xla_path, xbf, weights[name][1], experts())

    read_times = times.pop("numpy read")
    read = bandwidth_summary(read_times, buf.nbytes)
    results = {"numpy_read": read, "gemv": {}, "experts": E, "rounds": args.rounds, "machine": machine_info(),
               "kernel_isa": mxfp4_cpu.isa(), "kernel_threads_default": threads_default}
    rows = [["numpy streaming read", "-", "-", read["median_GBps"], read["best_GBps"], "100%", "100%", "100%"]]
    for key, ts in sorted(times.items(), key=lambda kv: (kv[0].split("|")[1], kv[0].split("|")[2], kv[0])):
        what, name, tlabel = key.split("|")
        N, K = SHAPES[name]
        s = bandwidth_summary(ts, TOPK * N * (K // 32) * 17)
        s["pct_of_read_median"] = 100 * s["median_GBps"] / read["median_GBps"]
        s["pct_of_read_best"] = 100 * s["best_GBps"] / read["best_GBps"]
        # each round's kernel rate over the same round's read rate: robust to the load drifting between rounds
        nb = TOPK * N * (K // 32) * 17
        s["pct_of_read_paired"] = 100 * statistics.median(
            (nb / t) / (buf.nbytes / r) for t, r in zip(ts, read_times))
        results["gemv"][key] = s
        rows.append([what, name, tlabel, s["median_GBps"], s["best_GBps"], f"{s['pct_of_read_median']:.0f}%",
                     f"{s['pct_of_read_paired']:.0f}%",
                     f"{s['pct_of_read_best']:.0f}%"])
    print_table(f"4-expert GEMV, packed GB/s (E={E}, experts drawn at random; ISA {mxfp4_cpu.isa()})",
                ["path", "shape", "threads", "median GB/s", "best GB/s", "% read (median)", "% read (paired)",
                 "% read (best)"], rows)

    results["prefill"] = prefill(rng, weights["gate_up"][1], args.prefill_tokens, E)
    path = write_json("mxfp4_kernel", results)
    log(f"wrote {path}")


def prefill(rng, w, T, E):
    """T tokens x top-4 through gate_up: kernel grouped (weights streamed once per expert) vs gather."""
    N, K = SHAPES["gate_up"]
    x = jnp.asarray(rng.normal(size=(T, K)), jnp.bfloat16)
    idx = jnp.asarray(np.stack([rng.choice(E, TOPK, replace=False) for _ in range(T)]), jnp.int32)
    flops = 2 * T * TOPK * N * K
    out, rows = {}, []
    best = mxfp4_cpu.isa()
    # the grouped call on every tile path this CPU has (AMX, VDPBF16PS) and on the AVX-512 FMA path below them
    tiers = [i for i in ("amx", "avx512bf16", "avx512")
             if mxfp4_cpu.ISAS.index(i) <= mxfp4_cpu.ISAS.index(best)] if best in mxfp4_cpu.ISAS else []
    runs = [(f"kernel grouped ({i})", True, i) for i in tiers or [best]] + [("kernel gather", False, best)]
    for label, grouped, isa in runs:
        mxfp4_cpu.set_isa(isa)
        f = jax.jit(lambda x, w, i, g=grouped: mxfp4_cpu.mx_gather_matmul(x, w, i, grouped=g))
        jax.block_until_ready(f(x, w, idx))
        ts = [timed(f, x, w, idx) for _ in range(3)]
        out[label] = {"median_s": statistics.median(ts), "GFLOPs": flops / statistics.median(ts) / 1e9}
    mxfp4_cpu.set_isa(best)
    a = jnp.asarray(rng.normal(size=(T * TOPK, K)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(K, N)), jnp.float32)
    gemm = jax.jit(lambda a, b: a @ b)
    jax.block_until_ready(gemm(a, b))
    ts = [timed(gemm, a, b) for _ in range(3)]
    out["XLA fp32 GEMM, same FLOPs (dense weights)"] = {"median_s": statistics.median(ts),
                                                         "GFLOPs": flops / statistics.median(ts) / 1e9}
    a16, b16 = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
    gemm16 = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
    jax.block_until_ready(gemm16(a16, b16))
    ts = [timed(gemm16, a16, b16) for _ in range(3)]
    out["XLA bf16 GEMM (fp32 out), same FLOPs"] = {"median_s": statistics.median(ts),
                                                   "GFLOPs": flops / statistics.median(ts) / 1e9}
    for label, r in out.items():
        rows.append([label, r["median_s"] * 1e3, r["GFLOPs"]])
    print_table(f"prefill: {T} tokens x top-{TOPK} through gate_up [{N}, {K}] (E={E})",
                ["path", "median ms", "GFLOP/s"], rows)
    return out


if __name__ == "__main__":
    main()
