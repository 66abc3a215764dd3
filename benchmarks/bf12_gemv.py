"""bf12 against bf16 on the library's kernels: the unembedding's GEMV and a decode step's attention projections (cold:
L layers' q/k/v + o in turn), one token and a 128-token prefill, the two forms in random order per round.

A one-token decode step reads every weight once, so it runs at the memory's speed; bf12 (gptoss.pack_dense) holds
the same bf16 bits in 77 % of the bytes. Both forms run on gptoss's kernels (bf16: dense_cpu, one token on
VDPBF16PS; bf12: bf12_cpu, decoded in registers, then the same instruction). Needs a CPU where bf12 is fast
(AVX-512 VBMI + BF16; skipped with a message otherwise). Prints a table, writes results/bf12_gemv.json.

    .venv/bin/python benchmarks/bf12_gemv.py [--rounds 40] [--layers 16] [--vocab 201088] [--tokens 1,2,4]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
from _common import log, machine_info, print_table, write_json

D, Q, KV = 2880, 4096, 512  # gpt-oss's hidden size, q width (64 heads x 64), kv width (8 x 64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--layers", type=int, default=16, help="layers of attention weights read in turn (cold)")
    ap.add_argument("--vocab", type=int, default=201088)
    ap.add_argument("--tokens", default="1", help="decode-sized token counts, comma-separated (batched decode: 2-4)")
    ap.add_argument("--prefill", type=int, default=128, help="tokens of the prefill-sized products (0: none)")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import ml_dtypes

    from gptoss.kernels import bf12_cpu, dense_cpu

    if not bf12_cpu.fast():
        print(f"bf12_gemv skipped: bf12 is not fast on this CPU (needs AVX-512 VBMI and BF16; ISA {bf12_cpu.isa()})")
        return
    rng = np.random.default_rng(0)

    def weight(rows, K):  # N(0, 0.02) in bf16, as the synthetic checkpoints
        return (rng.standard_normal((rows, K), dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)

    log(f"weights: unembedding {args.vocab} x {D}, {args.layers} layers of q/k/v/o")
    unembed = weight(args.vocab, D)
    layers = [(weight(Q, D), weight(KV, D), weight(KV, D), weight(D, Q)) for _ in range(args.layers)]
    forms = {"bf16": ([jnp.asarray(unembed)], [[jnp.asarray(w) for w in ws] for ws in layers]),
             "bf12": ([bf12_cpu.pack(unembed)], [[bf12_cpu.pack(w) for w in ws] for ws in layers])}
    exceptions = sum(w.num_exceptions for w in [forms["bf12"][0][0], *(w for ws in forms["bf12"][1] for w in ws)])
    forms["bf12"] = jax.tree.map(jnp.asarray, forms["bf12"])
    dense_many = jax.jit(lambda x, ws: dense_cpu.dense_matmul_many(x, ws, w_nk=True))
    packed_many = jax.jit(bf12_cpu.matmul_many)
    call = {"bf16": dense_many, "bf12": packed_many}

    def unembedding(form, x):
        jax.block_until_ready(call[form](x, forms[form][0]))

    def attention(form, x, o):
        for ws in forms[form][1]:  # q, k, v in one call, then o, layer after layer
            jax.block_until_ready((call[form](x, ws[:3]), call[form](o, ws[3:])))

    nbytes = {"bf16": {"unembedding": unembed.nbytes, "attention": sum(w.nbytes for ws in layers for w in ws)},
              "bf12": {"unembedding": forms["bf12"][0][0].nbytes,
                       "attention": sum(w.nbytes for ws in forms["bf12"][1] for w in ws)}}
    decode = [int(m) for m in args.tokens.split(",")]
    cases = [(what, M) for M in decode + ([args.prefill] if args.prefill else []) for what in ("unembedding",
                                                                                                "attention")]
    rows, out = [], {}
    for what, M in cases:
        x = jnp.asarray(rng.standard_normal((M, D)).astype(ml_dtypes.bfloat16))
        o = jnp.asarray(rng.standard_normal((M, Q)).astype(ml_dtypes.bfloat16))
        run = ((lambda f, x=x: unembedding(f, x)) if what == "unembedding"
               else (lambda f, x=x, o=o: attention(f, x, o)))
        for f in forms:
            run(f)  # compile, first touch
        t: dict = {f: [] for f in forms}
        rounds = args.rounds if M in decode else max(3, args.rounds // 8)
        for _ in range(rounds):
            for f in rng.permutation(list(forms)):
                t0 = time.perf_counter()
                run(f)
                t[f].append(time.perf_counter() - t0)
        t = {f: np.array(v) for f, v in t.items()}
        ratio = t["bf16"] / t["bf12"]
        fast = np.argsort(t["bf16"])[: max(1, rounds // 10)]  # bf16's fastest tenth: a fast memory phase
        for f in forms:
            gain = [np.median(ratio), *np.percentile(ratio, [10, 90]), np.median(ratio[fast])] if f == "bf12" else []
            rows.append([f"{what}, {M} token{'s' if M > 1 else ''}", f, nbytes[f][what] / 1e6,
                         1e3 * np.median(t[f]), nbytes[f][what] / np.median(t[f]) / 1e9, *gain])
        out[f"{what}_{M}"] = {"seconds": {f: v.tolist() for f, v in t.items()},
                              "bytes": {f: nbytes[f][what] for f in forms}, "speedup_median": float(np.median(ratio))}
    print_table(f"bf16 vs bf12 on gptoss's CPU kernels, {jax.local_devices()[0].platform}, cold, random order "
                f"({exceptions} exceptions)", ["product", "form", "MB", "median ms", "GB/s", "bf16 / bf12", "p10",
                                               "p90", "fast tenth"], rows)
    res = {"benchmark": "bf12_gemv", "machine": machine_info(), "args": vars(args), "exceptions": exceptions, **out}
    log(f"wrote {write_json('bf12_gemv', res)}")


if __name__ == "__main__":
    sys.exit(main())
