"""GPU check for a lent accelerator: pure-XLA dequantize-in-jit decode and prefill vs the HBM roofline.

gpt-oss-20b shapes (24 layers, 32 experts top-4, vocab 201088) with synthetic weights generated on the device
(gptoss.random_model: random MXFP4 bytes, bf16 rest), so nothing is read from disk. Reports: device memory
bandwidth measured in the same run (a large on-device reduction), batch-1 decode step time through the
engine (`generate`, gather MoE path, XLA dequantization), the weight bytes one step reads (packed experts +
bf16 rest), the roofline fraction, and prefill tokens/s (grouped MoE path). One short prepared script:

    python benchmarks/gpu.py              # on the GPU (or TPU): the 20b shapes
    python benchmarks/gpu.py --reduced    # anywhere, in seconds: tiny shapes (what the test suite runs)

It prints a table and writes benchmarks/results/gpu[_reduced].json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, print_table, write_json  # noqa: E402

from gptoss import ModelConfig, random_model  # noqa: E402
from gptoss.config import default_layer_types  # noqa: E402
from gptoss.engine import generate  # noqa: E402


def synthetic_model(cfg: ModelConfig, seed: int = 0):
    """Random weights made on the default device leaf by leaf; the pure-XLA paths (the CPU kernels are CPU-only)."""
    return random_model(cfg, dtype=jnp.bfloat16, experts="mxfp4", seed=seed, kernels="xla")


def device_bandwidth(gib: float) -> float:
    """Bytes/s of a large on-device reduction: what a weight-streaming decode step can hope for."""
    x = jnp.ones((int(gib * 2**30) // 4,), jnp.float32)
    f = jax.jit(jnp.sum)
    f(x).block_until_ready()
    best = min(_timed(lambda: f(x).block_until_ready()) for _ in range(5))
    return x.nbytes / best


def step_bytes(cfg: ModelConfig) -> int:
    """Weight bytes one batch-1 decode step reads: bf16 attention/router/unembedding + 4 packed experts/layer."""
    D, I = cfg.hidden_size, cfg.intermediate_size
    attn = D * (cfg.q_width + 2 * cfg.kv_width) + cfg.q_width * D + cfg.num_experts * D
    experts = cfg.experts_per_token * 3 * I * D * 17 // 32
    return cfg.num_hidden_layers * (2 * attn + experts) + 2 * cfg.vocab_size * D


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reduced", action="store_true", help="tiny shapes, any backend (the suite's smoke run)")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--prefill", type=int, default=2048)
    args = ap.parse_args()
    if args.reduced:
        cfg = ModelConfig.gpt_oss_20b().replace(num_hidden_layers=2, layer_types=default_layer_types(2),
                                                hidden_size=256, intermediate_size=256, num_experts=8,
                                                num_attention_heads=8, num_key_value_heads=2, vocab_size=1024)
        args.prompt, args.new, args.prefill = 16, 4, 64
    else:
        cfg = ModelConfig.gpt_oss_20b()
    backend = jax.default_backend()
    out = {"benchmark": "gpu", "backend": backend, "devices": [str(d) for d in jax.devices()],
           "machine": machine_info(), "reduced": args.reduced, "config": cfg.to_hf()}
    t0 = time.perf_counter()
    model = synthetic_model(cfg)
    out["init_s"] = time.perf_counter() - t0
    out["bandwidth_Bps"] = device_bandwidth(0.25 if args.reduced else 4.0)

    prompt = [np.random.default_rng(0).integers(0, cfg.vocab_size - 1, args.prompt).tolist()]
    generate(model, prompt, max_new_tokens=args.new + 1, stop_tokens=[])  # compile both lengths' loop
    generate(model, prompt, max_new_tokens=1, stop_tokens=[])
    ttft = min(_timed(lambda: generate(model, prompt, max_new_tokens=1, stop_tokens=[])) for _ in range(3))
    full = min(_timed(lambda: generate(model, prompt, max_new_tokens=args.new + 1, stop_tokens=[]))
               for _ in range(3))
    step = max(full - ttft, 1e-9) / args.new
    nbytes = step_bytes(cfg)
    out["decode"] = {"ttft_s": ttft, "step_s": step, "tok_s": 1 / step, "step_bytes": nbytes,
                     "roofline": nbytes / step / out["bandwidth_Bps"]}

    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size - 1, (1, args.prefill)).astype(np.int32)
    model(tokens, moe_impl="grouped").block_until_ready()
    t = min(_timed(lambda: model(tokens, moe_impl="grouped").block_until_ready()) for _ in range(3))
    out["prefill"] = {"tokens": args.prefill, "s": t, "tok_s": args.prefill / t}

    d = out["decode"]
    print_table(f"gpt-oss-20b shapes{' (REDUCED)' if args.reduced else ''} on {backend}: XLA dequantize-in-jit",
                ["bandwidth GB/s", "TTFT s", "decode tok/s", "GB/step", "roofline %", "prefill tok/s"],
                [[out["bandwidth_Bps"] / 1e9, d["ttft_s"], d["tok_s"], d["step_bytes"] / 1e9, 100 * d["roofline"],
                  out["prefill"]["tok_s"]]])
    path = write_json("gpu_reduced" if args.reduced else "gpu", out)
    print(json.dumps({"written": str(path)}))


if __name__ == "__main__":
    main()
