"""Sharded decode throughput: tokens/s of `generate` on 1, 2, 4 and 8 virtual CPU devices (expert parallel).

Each device count runs in its own process (XLA_FLAGS=--xla_force_host_platform_device_count=N must be set
before JAX starts). The model is a random small gpt-oss (bf16, MXFP4 experts: hidden 512, 16 experts top-4,
4 layers, vocab 2048) placed with `gptoss.sharding.shard_model` on the mesh {expert: N}; the batch of 8 rows is
split over the expert axis outside the MoE. On a CPU the virtual devices share the same cores, so this measures
the overhead of the sharded program (collectives, masking), not a speed-up: informative only.

    .venv/bin/python benchmarks/sharded_decode.py [--quick]

Results: a table on stdout and benchmarks/results/sharded_decode.json. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from _common import child_finish, log, machine_info, print_table, run_child, time_runs, write_json

DEVICE_COUNTS = (1, 2, 4, 8)
BATCH, PROMPT = 8, 32


def child(spec: dict) -> None:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={spec['devices']}"
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from gptoss import GptOss, ModelConfig
    from gptoss.engine import generate
    from gptoss.sharding import shard_model

    cfg = ModelConfig.tiny(vocab_size=2048, hidden_size=512, intermediate_size=512, num_hidden_layers=4,
                           num_attention_heads=8, num_key_value_heads=4, head_dim=64, num_experts=16,
                           experts_per_token=4, sliding_window=32, max_position_embeddings=1024)
    model = GptOss(cfg, dtype=jnp.bfloat16, experts="mxfp4", rngs=nnx.Rngs(0))
    if spec["mesh"]:
        model = shard_model(model, spec["mesh"])
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, cfg.vocab_size, PROMPT).tolist() for _ in range(BATCH)]
    new = spec["new"]

    def run():
        return generate(model, prompts, max_new_tokens=new, stop_tokens=[])

    warm = time_runs(run, 1)  # compile + first run
    timed = time_runs(run, spec["runs"])
    tokens = run().tokens
    child_finish(spec, {"devices": jax.device_count(), "mesh": spec["mesh"], "new_tokens": BATCH * new,
                        "compile_and_first_s": warm["median_s"], "median_s": timed["median_s"],
                        "tok_per_s": BATCH * new / timed["median_s"], "timing": timed,
                        "first_row": tokens[0][:8]})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="16 new tokens, 2 timed runs")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    new, runs = (16, 2) if args.quick else (64, 3)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in DEVICE_COUNTS:
            mesh = {"expert": n} if n > 1 else None
            log(f"{n} device(s), mesh {mesh}")
            spec = {"devices": n, "mesh": mesh, "new": new, "runs": runs, "out": os.path.join(tmp, f"{n}.json")}
            results.append(run_child(os.path.abspath(__file__), spec, timeout=900))
    rows = [[r.get("devices"), json.dumps(r.get("mesh")), r.get("new_tokens"), r.get("compile_and_first_s"),
             r.get("median_s"), r.get("tok_per_s"), r.get("error")] for r in results]
    print_table(f"decode, batch {BATCH}, prompt {PROMPT}, {new} new tokens per row (virtual CPU devices)",
                ["devices", "mesh", "tokens", "compile+first s", "median s", "tok/s", "error"], rows)
    same = len({json.dumps(r.get("first_row")) for r in results}) == 1
    print(f"greedy tokens identical across device counts: {same}")
    path = write_json("sharded_decode" + ("_quick" if args.quick else ""),
                      {"machine": machine_info(), "batch": BATCH, "prompt": PROMPT, "new_per_row": new,
                       "same_tokens": same, "results": results})
    log(f"wrote {path}")
    sys.exit(0 if all("error" not in r for r in results) else 1)


if __name__ == "__main__":
    main()
