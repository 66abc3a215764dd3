"""Dense bf16-weight CPU kernel benchmark: weight GB/s of the decode matmuls of gpt-oss at their real shapes.

With a few tokens, a matmul with bf16 weights is a pass over the weight, so memory bandwidth is its limit.
Measured, interleaved round by round so that all see the same machine load:
  * numpy streaming read (`uint8 .max()` over 1 GiB): the roofline, single-threaded;
  * the kernel, jitted (gptoss.kernels.dense_cpu.dense_matmul: the XLA FFI call the layers use), bf16 x, with the
    library's thread pool and with 1 thread, for M = 1 and 8 tokens on the unembedding [201088, 2880] and
    attention's wq [4096, 2880] and wo [2880, 4096] (all [out, in], w_nk, as the model stores them since
    2026-12-02); the attention weights are rotated through
    copies totalling >= 512 MiB, so that no call finds its weight in a cache (decode reads 24 layers' worth).
    Each measurement is a burst of back-to-back calls after one untimed call, as in a decode step: on this
    (virtual) machine the first ~2 ms of memory traffic after a pause run at a fraction of the steady rate,
    for numpy's read as much as for the kernel, which would otherwise dominate a single 24 MB call;
  * XLA's einsum as the model writes it (q/k/v/o: bf16 out; logits: fp32 out), a few rounds (it is slow);
  * the crossover: time per call of the kernel and of XLA's einsum for M = 1 .. 192 tokens (logits: 1 .. 16).

    .venv/bin/python benchmarks/dense_kernel.py            # 7 rounds
    .venv/bin/python benchmarks/dense_kernel.py --quick    # 3 rounds, crossover up to 96 tokens

Writes benchmarks/results/dense_kernel.json. Not a test.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from _common import bandwidth_summary, log, machine_info, print_table, write_json

from gptoss.kernels import dense_cpu, mxfp4_cpu

# name -> (weight shape, w_nk, the model's einsum, its preferred_element_type)
SHAPES = {
    "unembed": ((201088, 2880), True, "md,vd->mv", jnp.float32),
    "wq": ((4096, 2880), True, "md,nd->mn", None),
    "wo": ((2880, 4096), True, "mn,dn->md", None),
}
ROTATE_BYTES = 512 << 20


def stream_read(buf: np.ndarray) -> float:
    t = time.perf_counter()
    buf.max()
    return time.perf_counter() - t


def timed(fn, *args) -> float:
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t


def burst(fn, x, weights, calls: int) -> float:
    """Seconds per call over `calls` back-to-back calls on the next weights, after one untimed call."""
    jax.block_until_ready(fn(x, weights()))
    t = time.perf_counter()
    for _ in range(calls):
        out = fn(x, weights())
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / calls


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--xla-rounds", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.xla_rounds = 3, 1
    if not dense_cpu.kernel_available():
        raise SystemExit(f"the dense CPU kernel is unavailable: {dense_cpu.load_error()}")

    rng = np.random.default_rng(0)
    weights = {}
    for name, (shape, *_rest) in SHAPES.items():
        nbytes = 2 * shape[0] * shape[1]
        copies = max(1, -(-ROTATE_BYTES // nbytes))
        log(f"{name} {shape}: {copies} copies")
        base = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(jnp.bfloat16)
        weights[name] = [jnp.array(base, copy=True) for _ in range(copies)]  # distinct buffers
        del base
    buf = np.ones(1 << 30, np.uint8)
    threads = mxfp4_cpu.set_num_threads(0)
    kernel = jax.jit(dense_cpu.dense_matmul, static_argnames="w_nk")
    xla = {name: jax.jit(lambda x, w, s=spec, p=pref: jnp.einsum(s, x, w, preferred_element_type=p))
           for name, (_, _, spec, pref) in SHAPES.items()}
    xs = {(name, M): jnp.asarray(rng.normal(size=(M, shape[1] if w_nk else shape[0])), jnp.bfloat16)
          for name, (shape, w_nk, _, _) in SHAPES.items() for M in (1, 8)}
    turn = dict.fromkeys(SHAPES, 0)

    def next_weight(name):
        turn[name] += 1
        return weights[name][turn[name] % len(weights[name])]

    def calls(name):  # ~384 MiB per burst
        return max(1, min(len(weights[name]) - 2, (384 << 20) // (2 * SHAPES[name][0][0] * SHAPES[name][0][1])))

    log("warm-up (compiles)")
    for (name, _), x in xs.items():
        jax.block_until_ready(kernel(x, weights[name][0], w_nk=SHAPES[name][1]))
        jax.block_until_ready(xla[name](x, weights[name][0]))
    stream_read(buf)

    variants = [(name, M, n) for name in SHAPES for M in (1, 8) for n in (threads, 1)]
    times: dict[tuple, list[float]] = {}
    read_times = []
    log(f"{args.rounds} interleaved rounds")
    for r in range(args.rounds):
        read_times.append(stream_read(buf))
        for k in rng.permutation(len(variants)):
            name, M, n = variants[k]
            mxfp4_cpu.set_num_threads(n)
            times.setdefault(("kernel", name, M, n), []).append(
                burst(lambda x, w, nk=SHAPES[name][1]: kernel(x, w, w_nk=nk), xs[name, M],
                      lambda name=name: next_weight(name), calls(name)))
        mxfp4_cpu.set_num_threads(0)
        if r < args.xla_rounds:
            for name in SHAPES:
                for M in (1, 8):
                    times.setdefault(("XLA einsum", name, M, "XLA"), []).append(
                        burst(xla[name], xs[name, M], lambda name=name: next_weight(name),
                              1 if name == "unembed" else 4))

    read = bandwidth_summary(read_times, buf.nbytes)
    results = {"numpy_read": read, "gemv": {}, "rounds": args.rounds, "machine": machine_info(),
               "kernel_isa": dense_cpu.isa(), "threads_default": threads}
    rows = [["numpy streaming read", "-", "-", "1", read["median_GBps"], read["best_GBps"], "100%"]]
    for (what, name, M, n), ts in sorted(times.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0], str(kv[0][3]))):
        nbytes = 2 * SHAPES[name][0][0] * SHAPES[name][0][1]
        s = bandwidth_summary(ts, nbytes)
        # each run's rate over the same round's read rate: robust to the load drifting between rounds
        s["pct_of_read_paired"] = 100 * statistics.median((nbytes / t) / (buf.nbytes / rt)
                                                          for t, rt in zip(ts, read_times))
        results["gemv"][f"{what}|{name}|M={M}|threads={n}"] = s
        rows.append([what, f"{name} {SHAPES[name][0]}", M, n, s["median_GBps"], s["best_GBps"],
                     f"{s['pct_of_read_paired']:.0f}%"])
    print_table(f"weight GB/s per call (kernel ISA {dense_cpu.isa()}, bf16 x)",
                ["path", "weight", "M", "threads", "median GB/s", "best GB/s", "% read (paired)"], rows)

    results["crossover"] = crossover(rng, weights, kernel, xla, args.quick)
    path = write_json("dense_kernel", results)
    log(f"wrote {path}")


def crossover(rng, weights, kernel, xla, quick):
    """ms per call (median of 3 bursts), kernel vs XLA's einsum as the model writes it, over M tokens; the first M
    where XLA wins. The logits einsum (bf16 x and W, fp32 result) is a native bf16 GEMM in XLA:CPU from 2 tokens
    on; the q/k/v/o einsums (bf16 result) convert the weight to fp32 at any M."""
    tokens = {"unembed": [1, 2, 3, 4, 6, 8, 12, 16],
              "wq": [1, 4, 8, 16, 32, 48, 64, 96] + ([] if quick else [128, 192]),
              "wo": [1, 4, 8, 16, 32, 48, 64, 96] + ([] if quick else [128, 192])}
    out, rows = {}, []
    for name, ms_tokens in tokens.items():
        shape, w_nk = SHAPES[name][:2]
        ws = weights[name]
        calls = 1 if name == "unembed" else 4
        per = {}
        for M in ms_tokens:
            x = jnp.asarray(rng.normal(size=(M, shape[1] if w_nk else shape[0])), jnp.bfloat16)
            ms = {}
            for label, fn in (("kernel", functools.partial(kernel, w_nk=w_nk)), ("XLA", xla[name])):
                jax.block_until_ready(fn(x, ws[0]))  # compiles
                nxt = itertools.cycle(ws).__next__
                ms[label] = 1e3 * statistics.median(burst(fn, x, nxt, calls) for _ in range(3))
            per[M] = ms
            flops = 2 * M * shape[0] * shape[1]
            rows.append([name, M, ms["kernel"], ms["XLA"], flops / ms["kernel"] / 1e6, flops / ms["XLA"] / 1e6])
        xla_wins = [M for M in ms_tokens if per[M]["XLA"] < per[M]["kernel"]]
        out[name] = {"ms": per, "first_M_where_XLA_is_faster": xla_wins[0] if xla_wins else None}
    print_table("crossover: ms per call (bf16 x; XLA's einsum as the model writes it)",
                ["weight", "M", "kernel ms", "XLA ms", "kernel GFLOP/s", "XLA GFLOP/s"], rows)
    for name, r in out.items():
        log(f"{name}: XLA first faster at M = {r['first_M_where_XLA_is_faster']}")
    return out


if __name__ == "__main__":
    main()
