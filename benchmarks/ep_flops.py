"""Expert parallelism skips the pairs routed to other devices: per-device MoE FLOPs with `expert=8` vs one device.

One MoE layer at gpt-oss-20b widths (2880 hidden, 2880 intermediate, 32 experts top-4; random weights, MXFP4
experts, float32 activations) on 8 virtual CPU devices. FLOPs are XLA's cost analysis of the compiled layer (the
per-device program), for the strategies whose work it can see: `dense` (each device runs its 4 local experts)
and `gather` (each device packs its local pairs first and runs them in chunks of pairs/8, as many chunks as it
needs; cost analysis counts one). `grouped` loops over experts with data-dependent trip counts, which cost
analysis cannot count; its executed work is the local pair count itself. So the table also gives, from the
actual routing of random tokens, the pairs each device owns and the chunks the gather strategy runs.

    .venv/bin/python benchmarks/ep_flops.py [--tokens 64 512]

Prints a table and writes benchmarks/results/ep_flops.json.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import argparse  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, print_table, write_json  # noqa: E402

from gptoss import ModelConfig, random_model  # noqa: E402
from gptoss.config import default_layer_types  # noqa: E402
from gptoss.layers.moe import route  # noqa: E402
from gptoss.sharding import shard_model  # noqa: E402
from gptoss.sharding.moe import CHUNK_ALIGN  # noqa: E402

SHARDS = 8


def layer_flops(model, x, impl: str) -> float:
    graphdef, state = nnx.split(model.layers[0].mlp)
    rt = model.runtime(impl)
    compiled = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, rt)[0]).lower(state, x).compile()
    cost = compiled.cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[64, 512])
    args = ap.parse_args()
    cfg = ModelConfig.gpt_oss_20b().replace(num_hidden_layers=1, layer_types=default_layer_types(1), vocab_size=512)
    single = random_model(cfg, dtype=jnp.float32, experts="mxfp4", kernels="xla")
    sharded = shard_model(random_model(cfg, dtype=jnp.float32, experts="mxfp4", kernels="xla"), {"expert": SHARDS})
    E_l = cfg.num_experts // SHARDS
    rows, out = [], {"benchmark": "ep_flops", "machine": machine_info(), "devices": jax.device_count(), "rows": []}
    for T in args.tokens:
        x = jnp.asarray(np.random.default_rng(T).normal(size=(1, T, cfg.hidden_size)), jnp.float32)
        mlp = single.layers[0].mlp
        normed = x.reshape(T, -1)
        _, idx, _ = route(normed, mlp.router_ED[...], mlp.router_bias_E[...], cfg.experts_per_token)
        local = np.bincount(np.asarray(idx).reshape(-1) // E_l, minlength=SHARDS)
        A = T * cfg.experts_per_token
        C = min(A, -(-A // (SHARDS * CHUNK_ALIGN)) * CHUNK_ALIGN)
        chunks = -(-local // C)
        for impl in ("gather", "dense"):
            one, per = layer_flops(single, x, impl), layer_flops(sharded, x, impl)
            r = {"tokens": T, "strategy": impl, "flops_single": one, "flops_per_device": per, "ratio": per / one,
                 "pairs": A, "local_pairs_min_max": [int(local.min()), int(local.max())], "chunk_rows": C,
                 "gather_chunks_run_max": int(chunks.max()), "gather_work_max": float(chunks.max() * C / A)}
            out["rows"].append(r)
            rows.append([T, impl, one / 1e9, per / 1e9, r["ratio"], f"{local.min()}-{local.max()} of {A}",
                         f"{int(chunks.max())} x {C}" if impl == "gather" else "-"])
    print_table(f"one MoE layer at gpt-oss-20b widths, expert={SHARDS} vs 1 device (XLA cost analysis)",
                ["tokens", "strategy", "GFLOP 1 device", "GFLOP per device", "ratio", "local pairs/device",
                 "gather chunks run (max)"], rows)
    write_json("ep_flops", out)


if __name__ == "__main__":
    main()
