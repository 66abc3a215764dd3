"""Compile time of the forward pass and of a gradient, with abstract gpt-oss-120b-width parameters.

Nothing is allocated: the model is `nnx.eval_shape`d (bf16, MXFP4 experts, 128 experts top-4, vocab 201088) with
6 / 12 / 24 / 36 layers, and `jax.jit(...).lower(...).compile()` is timed for tokens [1, 256] (the MoE's `auto`
strategy is grouped there): the forward, and jax.grad of the mean next-token NLL w.r.t. every float parameter
(the packed experts are frozen). For each kernels option (cpu: the CPU kernels; xla: the pure-XLA reference
twins, what a GPU or TPU compiles). Layers are a Python loop (no scan), so the time grows with depth.

    .venv/bin/python benchmarks/compile_time.py                  # 6 12 24 36 layers, both backends
    .venv/bin/python benchmarks/compile_time.py --layers 36 --kernels xla

Prints a table and writes benchmarks/results/compile_time.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, print_table, write_json  # noqa: E402

from gptoss import GptOss, ModelConfig  # noqa: E402
from gptoss.config import default_layer_types  # noqa: E402


def compile_seconds(layers: int, kernels: str, tokens: int) -> dict:
    cfg = ModelConfig.gpt_oss_120b().replace(num_hidden_layers=layers, layer_types=default_layer_types(layers))
    abstract = nnx.eval_shape(lambda: GptOss(cfg, dtype=jnp.bfloat16, experts="mxfp4", kernels=kernels))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    toks = jax.ShapeDtypeStruct((1, tokens + 1), jnp.int32)

    def forward(params, rest, t):
        return nnx.merge(graphdef, params, rest).forward(t[:, :-1])

    def nll(params, rest, t):
        logp = jax.nn.log_softmax(forward(params, rest, t).astype(jnp.float32), axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, t[:, 1:, None], axis=-1))

    out = {"layers": layers, "kernels": kernels, "tokens": tokens}
    for name, fn in (("forward", forward), ("gradient", jax.grad(nll))):
        t0 = time.perf_counter()
        try:
            jax.jit(fn).lower(params, rest, toks).compile()
            out[name + "_s"] = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - reported in the table
            out[name + "_s"] = None
            out[name + "_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[6, 12, 24, 36])
    ap.add_argument("--kernels", nargs="+", default=["cpu", "xla"], choices=["cpu", "xla"])
    ap.add_argument("--tokens", type=int, default=256)
    args = ap.parse_args()
    rows = []
    for kernels in args.kernels:
        for layers in args.layers:
            r = compile_seconds(layers, kernels, args.tokens)
            rows.append(r)
            print(r, flush=True)
    print_table(f"compile seconds, gpt-oss-120b widths, tokens [1, {args.tokens}], {jax.default_backend()}",
                ["kernels", "layers", "forward s", "gradient s", "sum s"],
                [[r["kernels"], r["layers"], r["forward_s"], r["gradient_s"],
                  (r["forward_s"] or 0) + (r["gradient_s"] or 0)] for r in rows])
    write_json("compile_time", {"benchmark": "compile_time", "machine": machine_info(), "rows": rows})


if __name__ == "__main__":
    main()
