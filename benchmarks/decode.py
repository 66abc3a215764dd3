"""Decode benchmark: gptoss's engine vs transformers `generate` on one synthetic MXFP4 checkpoint.

Real gpt-oss widths (hidden 2880, 64/8 heads, 32 experts top-4, vocab 201088) with few layers. Each side runs in
its own subprocess. Per side: time to first token (prefill of a P-token prompt + one sampled token), prefill
tokens/s, and decode tokens/s at batch 1 and batch 8, greedy: TTFT the median of `generate` calls for 1 new
token; decode from the median time between new tokens of calls for 1+N (ours: generate's progress callback;
transformers: a streamer), not a difference of whole calls, which carried the prefill's run-to-run noise.
Roofline: the weight bytes one decode step reads, in each side's own storage format (ours: packed MXFP4 experts +
model-dtype rest; transformers: bf16 everywhere, since it dequantizes MXFP4 at load on CPU), divided by the step
time, over the numpy streaming-read bandwidth measured in the same run. `--shape-20b` also writes a
gpt-oss-20b-shaped checkpoint (12.8 GiB, removed afterwards) and decodes it with ours at batch 1.

    .venv/bin/python benchmarks/decode.py --quick      # 2 layers, short: a smoke run
    .venv/bin/python benchmarks/decode.py              # 6 layers
    .venv/bin/python benchmarks/decode.py --shape-20b  # plus the 20b-shape decode
    .venv/bin/python benchmarks/decode.py --no-amx     # AMX denied to both sides (oneDNN, XLA, gptoss)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import numpy as np
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

SEED = 4321


def bench_config(layers: int):
    from gptoss import ModelConfig
    from gptoss.config import default_layer_types

    return ModelConfig.gpt_oss_20b().replace(num_hidden_layers=layers, layer_types=default_layer_types(layers))


def prompts_for(batch: int, length: int, vocab: int) -> list[list[int]]:
    rng = np.random.default_rng([SEED, batch, length])
    return rng.integers(0, 199990, size=(batch, length)).tolist()  # ordinary ids: no stop token in prompts


def stream_read_gbps(gib: float = 1.0, runs: int = 5) -> float:
    """numpy single-thread streaming read (sum of a float64 array larger than any cache): the decode roofline."""
    buf = np.ones(int(gib * GIB) // 8)
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t0)
    return buf.nbytes / best / 1e9


def step_bytes(cfg, batch: int, side: str, dtype_bytes: int) -> int:
    """Weight bytes read by one decode step: attention + router + the experts the batch hits + unembedding."""
    D, E, I, k = cfg.hidden_size, cfg.num_experts, cfg.intermediate_size, cfg.experts_per_token
    attn = D * (cfg.q_width + 2 * cfg.kv_width) + cfg.q_width * D
    hit = E * (1 - (1 - k / E) ** batch)  # expected distinct experts per layer
    per_expert = 3 * I * D  # gate_up [2I, D] + down [D, I]
    expert_bytes = per_expert * (17 / 32 if side == "ours" else 2)  # MXFP4: 16 bytes + 1 scale per 32
    layer = (attn + E * D) * dtype_bytes + hit * expert_bytes
    return int(cfg.num_hidden_layers * layer + cfg.vocab_size * D * dtype_bytes)


def step_read_set(model, rng) -> list[list]:
    """The weight arrays a batch-1 decode step of `model` reads, grouped as its kernel calls are (per layer: q/k/v,
    wo, router, the routed experts' gate_up, their down; then the unembedding), as in-place numpy views. The
    experts are drawn at random per layer, as routing on random weights does. Biases, norms and the KV cache
    (< 1 % of the bytes at these lengths) are left out. Input for `probe_step_s`."""
    import numpy as np

    from gptoss.quant import BF12Array

    k = model.config.experts_per_token

    def views(p) -> list:  # a CPU jax array's buffer, not a copy; a bf12 weight's rows and exceptions
        v = p[...]
        return ([np.asarray(a) for a in (v.data, v.exc_rows, v.exc_cols, v.exc_bits)] if isinstance(v, BF12Array)
                else [np.asarray(v)])

    runs = []
    for block in model.layers:
        a, m = block.attn, block.mlp
        runs += [views(a.wq_NHD) + views(a.wk_KHD) + views(a.wv_KHD), views(a.wo_DNH), views(m.router_ED)]
        gate_up, down = m.gate_up_EFD[...], m.down_EDI[...]
        experts = rng.choice(model.config.num_experts, k, replace=False)
        for w in (gate_up, down):
            blocks, scales = np.asarray(w.blocks), np.asarray(w.scales)
            runs.append([part[e] for e in experts for part in (blocks, scales)])
    runs.append(views(model.unembed_VD))
    return runs


def synthetic_read_set(cfg, rng, pool: int = 8, dense: str = "bf16"):
    """`step_read_set`'s arrays without a model: the same shapes and dtypes per kernel call, for `cfg`, in fresh
    memory (filled, so every page is real), with `pool` experts per layer to draw the step's k from (cold: the pool
    of a 20b-shaped config is ~2.6 GB). Returns a function of nothing that gives one step's runs. For timing the
    roofline beside a process that holds the model (llama.cpp), where this one cannot hold ours too. `dense`: "bf12"
    where the model's attention and unembedding are packed (gptoss.pack_dense): their rows at 49 bytes per 32
    weights (the exceptions, ~0.03 % of the weights, left out)."""
    D, k, I, V = cfg.hidden_size, cfg.experts_per_token, cfg.intermediate_size, cfg.vocab_size
    G, pool = D // 32, max(pool, k)
    full = lambda *shape: np.full(shape, 1, np.uint8)  # noqa: E731
    bf16 = lambda rows: full(rows, 2 * D)  # noqa: E731  (bf16 [rows, D] as bytes)
    # bf16 [rows, K] as bytes, or bf12 where pack_dense packs it (whole 32-blocks)
    packed = lambda rows, K=D: full(rows, K // 32 * 49 if dense == "bf12" and K % 32 == 0 else 2 * K)  # noqa: E731
    layers = []
    for _ in range(cfg.num_hidden_layers):
        attn = [[packed(cfg.q_width), packed(cfg.kv_width), packed(cfg.kv_width)], [packed(D, cfg.q_width)],
                [bf16(cfg.num_experts)]]
        experts = [[(full(2 * I, G, 16), full(2 * I, G)), (full(D, I // 32, 16), full(D, I // 32))]
                   for _ in range(pool)]
        layers.append((attn, experts))
    unembed = packed(V)

    def runs() -> list[list]:
        out = []
        for attn, experts in layers:
            pick = rng.choice(pool, k, replace=False)
            out += attn + [[part for e in pick for part in experts[e][w]] for w in (0, 1)]
        return out + [[unembed]]

    return runs


def probe_runs_s(step_runs, reps: int = 5) -> tuple[float, int]:
    """The median time (s) to read one decode step's weights (`step_runs()`: fresh experts each rep) through the
    kernels' pool with no compute (`mxfp4_cpu.read_probe`, one pool run per kernel call), and the bytes read: the
    step's memory roofline in the current seconds."""
    import time

    from gptoss.kernels import mxfp4_cpu

    times, nbytes = [], 0
    for _ in range(reps):
        runs = step_runs()
        nbytes = sum(a.nbytes for run in runs for a in run)
        t0 = time.perf_counter()
        for run in runs:
            mxfp4_cpu.read_probe(run)
        times.append(time.perf_counter() - t0)
    return sorted(times)[reps // 2], nbytes


def probe_step_s(model, rng, reps: int = 5) -> tuple[float, int]:
    """`probe_runs_s` on `model`'s own weights (`step_read_set`)."""
    return probe_runs_s(lambda: step_read_set(model, rng), reps)


# ---------------------------------------------------------------------------------------------- children
def child_ours(spec: dict) -> dict:
    import gptoss
    from gptoss.engine import generate

    t0 = time.perf_counter()
    model = gptoss.from_pretrained(spec["ckpt"], dtype=spec["dtype"], progress=False)
    res = {"load_s": time.perf_counter() - t0, "kernel": kernel_state()}

    def run(prompts, n, stamps=None):  # stamps: a time per progress report (the prefill's comes early: unused)
        t0 = time.perf_counter()
        clock = (lambda _: stamps.append(time.perf_counter())) if stamps is not None else False
        out = generate(model, prompts, max_new_tokens=n, stop_tokens=[], progress=clock)
        return time.perf_counter() - t0, out.tokens

    return res | measure(spec, run, model.config.vocab_size)


def child_hf(spec: dict) -> dict:
    import torch
    from transformers import GptOssForCausalLM, Mxfp4Config

    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    model = GptOssForCausalLM.from_pretrained(spec["ckpt"], quantization_config=Mxfp4Config(dequantize=True),
                                              dtype=torch.bfloat16, attn_implementation="eager").eval()
    res = {"load_s": time.perf_counter() - t0}

    class Clock:  # a streamer: put() gets the prompt, then each new token (stamps[0]: the prompt, unused)
        def __init__(self, stamps):
            self.stamps = stamps

        def put(self, value):
            self.stamps.append(time.perf_counter())

        def end(self):
            pass

    def run(prompts, n, stamps=None):
        ids = torch.tensor(prompts)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, eos_token_id=None, pad_token_id=0,
                                 streamer=Clock(stamps) if stamps is not None else None)
        return time.perf_counter() - t0, out[:, ids.shape[1]:].tolist()

    return res | measure(spec, run, model.config.vocab_size)


def measure(spec: dict, run, vocab: int) -> dict:
    res: dict = {"batches": {}}
    for batch in spec["batches"]:
        prompts = prompts_for(batch, spec["prompt_len"], vocab)
        log(f"{spec['name']}: batch {batch}: warm-up")
        run(prompts, 1)
        run(prompts, spec["new"] + 1)  # compiles the decode loop (ours); warms caches (both)
        ttfts = sorted(run(prompts, 1)[0] for _ in range(spec["runs"]))
        ttft = ttfts[len(ttfts) // 2]
        steps = []  # the time between consecutive new tokens after the first, over all runs
        for _ in range(spec["runs"]):
            stamps: list[float] = []
            _, tokens = run(prompts, spec["new"] + 1, stamps)
            steps += [b - a for a, b in zip(stamps[1:], stamps[2:])]
        step = sorted(steps)[len(steps) // 2]
        decode_s = step * spec["new"]
        entry = {"ttft_s": ttft, "prefill_tok_s": batch * spec["prompt_len"] / ttft, "decode_s": decode_s,
                 "step_s": step, "decode_tok_s": batch * spec["new"] / decode_s, "tokens": tokens}
        res["batches"][str(batch)] = entry
        log(f"{spec['name']}: batch {batch}: ttft {ttft:.2f}s, decode {entry['decode_tok_s']:.2f} tok/s")
    return res


def child_main(spec: dict) -> None:
    res = {"name": spec["name"], "side": spec["side"]}
    res.update(child_ours(spec) if spec["side"] == "ours" else child_hf(spec))
    child_finish(spec, res)


# ---------------------------------------------------------------------------------------------- parent
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new", type=int, default=32, help="decode steps timed")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="2 layers, prompt 32, 8 steps, batch 1")
    ap.add_argument("--shape-20b", action="store_true", help="also decode a gpt-oss-20b-shaped checkpoint (ours)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--only", help="comma list of runs to do (ours_bf16, ours_fp32, hf_bf16)")
    ap.add_argument("--no-amx", action="store_true",
                    help="deny AMX to every side (seccomp; _common.deny_amx): an AMX Xeon as a CPU without AMX")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child_main(json.loads(args.child))
    if args.no_amx:
        deny_amx()  # inherited by the children: both sides
    if args.quick:
        args.layers, args.prompt_len, args.new, args.batches = 2, 32, 8, [1]
    interrupt_on_sigterm()
    script = os.path.abspath(__file__)
    cfg = bench_config(args.layers)
    work = tempfile.mkdtemp(prefix="gptoss-bench-decode-", dir="/tmp")
    out = {"benchmark": "decode", "machine": machine_info(), "layers": args.layers, "prompt_len": args.prompt_len,
           "new": args.new, "batches": args.batches, "runs": {}, "amx_denied": args.no_amx}
    try:
        out["read_gbps"] = stream_read_gbps()
        log(f"numpy streaming read: {out['read_gbps']:.1f} GB/s")
        ckpt = os.path.join(work, "ckpt")
        out["checkpoint"] = write_synthetic_hf_mxfp4(ckpt, cfg, fill="random", n_shards=2, seed=0)
        common = {"ckpt": ckpt, "prompt_len": args.prompt_len, "new": args.new, "batches": args.batches,
                  "runs": args.runs}
        plan = [("ours_bf16", "ours", "bfloat16"), ("ours_fp32", "ours", "float32")]
        if not args.skip_hf:
            plan.append(("hf_bf16", "hf", "bfloat16"))
        if args.only:
            plan = [p for p in plan if p[0] in args.only.split(",")]
        for name, side, dtype in plan:
            spec = {**common, "name": name, "side": side, "dtype": dtype, "out": os.path.join(work, name + ".json")}
            out["runs"][name] = run_child(script, spec, timeout=3600) | {"dtype": dtype}
        shutil.rmtree(ckpt)
        if args.shape_20b:
            cfg20 = bench_config(24)
            ckpt20 = os.path.join(work, "ckpt20b")
            out["checkpoint_20b"] = write_synthetic_hf_mxfp4(ckpt20, cfg20, fill="tiled", n_shards=3, seed=0)
            spec = {**common, "ckpt": ckpt20, "batches": [1], "new": 16, "name": "ours_20b_bf16", "side": "ours",
                    "dtype": "bfloat16", "out": os.path.join(work, "20b.json")}
            out["runs"]["ours_20b_bf16"] = run_child(script, spec, timeout=3600) | {"dtype": "bfloat16", "cfg": "20b"}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(out, cfg)
    write_json(("decode_quick" if args.quick else "decode") + ("_noamx" if args.no_amx else ""), out)


def report(out: dict, cfg) -> None:
    from gptoss import ModelConfig

    rows = []
    hf = out["runs"].get("hf_bf16", {}).get("batches", {})
    for name, r in out["runs"].items():
        if "error" in r:
            rows.append([name, r["error"]])
            continue
        c = ModelConfig.gpt_oss_20b() if r.get("cfg") == "20b" else cfg
        for batch, e in r["batches"].items():
            side = "hf" if name.startswith("hf") else "ours"
            nbytes = step_bytes(c, int(batch), side, 4 if r["dtype"] == "float32" else 2)
            e["step_bytes"], e["roofline"] = nbytes, nbytes / e["step_s"] / 1e9 / out["read_gbps"]
            ref = hf.get(batch)
            ratio = e["decode_tok_s"] / ref["decode_tok_s"] if ref and r.get("cfg") != "20b" else None
            same = (sum(a == b for x, y in zip(e["tokens"], ref["tokens"]) for a, b in zip(x, y))
                    / max(1, sum(len(x) for x in ref["tokens"]))) if ref and r.get("cfg") != "20b" else None
            e["vs_hf"], e["greedy_agreement_vs_hf"] = ratio, same
            rows.append([name, batch, e["ttft_s"], e["prefill_tok_s"], e["decode_tok_s"], e["step_bytes"] / 1e9,
                         100 * e["roofline"], ratio, None if same is None else 100 * same, r.get("load_s")])
    print_table(f"Decode, {out['layers']} layers at gpt-oss widths (MXFP4 checkpoint), prompt {out['prompt_len']}, "
                f"{out['new']} greedy steps; read bandwidth {out['read_gbps']:.1f} GB/s"
                + ("; AMX denied (--no-amx)" if out.get("amx_denied") else ""),
                ["run", "batch", "TTFT s", "prefill tok/s", "decode tok/s", "GB/step", "roofline %", "vs hf",
                 "same tokens %", "load s"], rows)


if __name__ == "__main__":
    main()
