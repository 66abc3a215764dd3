"""Long-prefill memory from XLA's compiled memory analysis: no weights, no run, any backend.

For gpt-oss-20b shapes (abstract weights from `nnx.eval_shape`) and prompts of 8,192 and 32,768 tokens it compiles
(1) one full-attention layer's attention: the whole-matrix `attend` vs the path a prefill takes (`attend_blocked`,
which past FLASH_FROM tokens is the `attend_flash` loop), and (2) generate's prefill (forward and cache writes)
at a few depths (the pure-XLA path), and compares the temporaries with the sharding planner's prefill figure:

    python benchmarks/prefill_memory.py                 # 8192 and 32768 tokens, prefill at 1 and 2 layers
    python benchmarks/prefill_memory.py --reduced       # small shapes, seconds (the suite's smoke run)

It prints a table and writes benchmarks/results/prefill_memory[_reduced].json.
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
from _common import GIB, machine_info, print_table, write_json  # noqa: E402

from gptoss import GptOss, ModelConfig  # noqa: E402
from gptoss.config import default_layer_types  # noqa: E402
from gptoss.engine import init_cache  # noqa: E402
from gptoss.layers.attention import FLASH_FROM, attend, attend_blocked  # noqa: E402
from gptoss.sharding.planner import plan  # noqa: E402


def _temp(fn, *args) -> tuple[int, float]:
    t0 = time.perf_counter()
    analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
    return int(analysis.temp_size_in_bytes), time.perf_counter() - t0


def attention_temps(cfg: ModelConfig, T: int) -> dict:
    """Temporaries of one full-attention layer's attention over a T-token prompt (bf16 q/k/v, fp32 out)."""
    N, K, H = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q = jax.ShapeDtypeStruct((1, T, N, H), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, T, K, H), jnp.bfloat16)
    pos = jax.ShapeDtypeStruct((1, T), jnp.int32)
    sinks = jax.ShapeDtypeStruct((N,), jnp.float32)
    out = {"score_matrix_bytes": N * T * T * 4}
    for name, fn in (("whole_matrix", attend), ("prefill_path", attend_blocked)):
        out[f"{name}_temp_bytes"], out[f"{name}_compile_s"] = _temp(
            lambda *a, fn=fn: fn(*a, window=None, scale=H**-0.5), q, kv, kv, sinks, pos, pos)
    return out


def prefill_temps(cfg: ModelConfig, T: int, layers: int) -> dict:
    """Temporaries of generate's prefill of one T-token prompt into a T-slot cache, `layers` deep: the forward and the
    cache writes; not the last token's logits, whose bf16 GEMM XLA:CPU runs on an fp32 copy of the unembedding
    (2.2 GiB; GPUs multiply bf16 directly, and the CPU kernels serve it here without a copy)."""
    cfg = cfg.replace(num_hidden_layers=layers, layer_types=default_layer_types(layers))
    model = nnx.eval_shape(lambda: GptOss(cfg, dtype=jnp.bfloat16, experts="mxfp4", kernels="xla"))
    graphdef, state = nnx.split(model)
    tokens = jax.ShapeDtypeStruct((1, T), jnp.int32)

    def run(state, tokens, positions):
        model = nnx.merge(graphdef, state)
        cache = init_cache(cfg, 1, T, model.dtype, None)
        x, _, cache = model.hidden_states(tokens, positions, cache, in_order=True)
        return x[:, -1], cache

    temp, secs = _temp(run, state, tokens, tokens)
    return {"layers": layers, "temp_bytes": temp, "compile_s": secs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reduced", action="store_true", help="small widths and prompts (the suite's smoke run)")
    ap.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 2], help="depths of the whole-prefill compile")
    args = ap.parse_args()
    cfg = ModelConfig.gpt_oss_20b()
    if args.reduced:
        cfg = cfg.replace(hidden_size=128, intermediate_size=128, num_experts=8, num_attention_heads=8,
                          num_key_value_heads=2, head_dim=16, vocab_size=1024)
        args.tokens, args.layers = [2 * FLASH_FROM], [1]
    rows, results = [], []
    for T in args.tokens:
        a = attention_temps(cfg, T)
        est = plan(cfg, None, context=T, batch=1, prefill=T).prefill_activation_bytes
        res = {"tokens": T, "attention": a, "planner_prefill_bytes": est, "prefill": []}
        for L in args.layers:
            res["prefill"].append(prefill_temps(cfg, T, L))
        results.append(res)
        worst = max(p["temp_bytes"] for p in res["prefill"])
        rows.append([f"{T:,}", f"{a['score_matrix_bytes'] / GIB:.2f}", f"{a['whole_matrix_temp_bytes'] / GIB:.2f}",
                     f"{a['prefill_path_temp_bytes'] / GIB:.3f}",
                     " / ".join(f"{p['temp_bytes'] / GIB:.2f}" for p in res["prefill"]), f"{est / GIB:.2f}",
                     "yes" if est >= worst else "NO"])
    print_table(f"prefill temporaries, gpt-oss-20b widths{' (reduced)' if args.reduced else ''}, "
                f"{jax.default_backend()} compile", ["tokens", "fp32 scores GiB", "attend GiB", "flash GiB",
                 f"prefill temp GiB ({'/'.join(map(str, args.layers))} layers)", "planner GiB", "planner >= prefill"],
                rows)
    write_json("prefill_memory_reduced" if args.reduced else "prefill_memory",
               {"benchmark": "prefill_memory", "backend": jax.default_backend(), "machine": machine_info(),
                "reduced": args.reduced, "config": cfg.to_hf(), "flash_from": FLASH_FROM, "results": results})


if __name__ == "__main__":
    main()
