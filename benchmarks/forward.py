"""Prefill benchmark: gptoss (JAX, MXFP4 experts kept packed) vs transformers on one synthetic MXFP4 checkpoint.

Writes a synthetic HF-layout MXFP4 checkpoint with gpt-oss's real widths (hidden 2880, 64/8 heads, 32 experts
top-4, vocab 201088) but few layers, then measures each side in its own subprocess (so peak RSS is per side
and memory is freed between them): load time, peak RSS, prefill tokens/s (batch 1, median of --runs runs after
a warm-up call, which for ours includes the XLA compile and is reported separately), and the agreement of the
greedy top-1 tokens with transformers' bf16 logits (same checkpoint, same tokens).

    .venv/bin/python benchmarks/forward.py --quick            # 2 layers, T=64: a cheap smoke run
    .venv/bin/python benchmarks/forward.py                    # 6 layers, T=128 and T=512
    .venv/bin/python benchmarks/forward.py --experts dense    # also ours with experts dequantized at load
    .venv/bin/python benchmarks/forward.py --xla              # also ours with GPTOSS_KERNELS=xla (pure XLA)

Runs: ours_{fp32,bf16} (from_pretrained dtype, experts mxfp4, moe_impl grouped = the prefill choice of auto),
[ours_*_xla], [ours_*_dense], hf_bf16 (transformers, MXFP4 dequantized to bf16 at load; timed with its default
experts implementation and with "eager"), hf_fp32. A run whose estimated peak RSS exceeds --mem-budget-gib or
the free memory is skipped and says why (at 6 layers: ours_fp32_dense, hf_fp32). Memory: hf_bf16 peaks at
~15.2 GiB at 6 layers, the largest run. Timings on a shared machine are noisy: each run records the 1-minute
load average and per-call rusage (user/sys CPU, page faults) in the JSON.

Results: a table on stdout and benchmarks/results/forward[_quick].json. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
from _common import (
    GIB,
    available_bytes,
    child_finish,
    interrupt_on_sigterm,
    kernel_state,
    log,
    machine_info,
    param_bytes,
    peak_rss_bytes,
    print_table,
    rss_bytes,
    run_child,
    time_runs,
    write_json,
    write_synthetic_hf_mxfp4,
)

TOKEN_SEED = 1234


# ---------------------------------------------------------------------------------------------- config
def bench_config(layers: int):
    from gptoss import ModelConfig
    from gptoss.config import default_layer_types

    return ModelConfig.gpt_oss_20b().replace(num_hidden_layers=layers, layer_types=default_layer_types(layers))


def prefill_flops(cfg: dict, T: int) -> float:
    """Matmul FLOPs of a T-token prefill (HF config dict): projections, router, k experts, logits for all T."""
    D, I, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    per_layer = D * (q + 2 * kv) + q * D + cfg["num_local_experts"] * D + cfg["num_experts_per_tok"] * 3 * I * D
    return 2.0 * T * (cfg["num_hidden_layers"] * per_layer + V * D)


def tokens_for(T: int, vocab: int) -> np.ndarray:
    return np.random.default_rng([TOKEN_SEED, T]).integers(0, vocab, size=(1, T), dtype=np.int64)


def estimate_peak_bytes(cfg, side: str, dtype: str, experts: str) -> int:
    """Rough peak RSS of one run: parameters + the biggest load-time transient + runtime/import overhead."""
    L, E, D, I = cfg.num_hidden_layers, cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
    nb = 4 if dtype == "float32" else 2
    expert_params = L * E * (2 * I * D + D * I)
    other = cfg.num_params() - expert_params
    dense = side == "hf" or experts == "dense"
    experts_bytes = expert_params * nb if dense else L * E * (2 * I * (D // 32) + D * (I // 32)) * 17
    model = other * nb + experts_bytes
    # Calibrated on measured runs (each a little above): ours dense: one layer's gate_up dequantized (output +
    # a host copy); transformers: the embedding read + its conversion; ours packed: the embedding read, its NaN
    # check and its conversion/copy.
    VD = cfg.vocab_size * D
    if side == "hf":  # measured peaks: bf16 7.7 GiB for 5.2 GiB of parameters (2 layers), 15.4 for 11.4 (6 layers);
        return int(model * (1.2 if nb == 2 else 1.55) + 2 * GIB)  # fp32 17.9 for 10.4 (2 layers)
    transient = E * 2 * I * D * nb * 2 if dense else VD * (nb + 2)
    return int(model + transient + 0.5 * GIB)


# ---------------------------------------------------------------------------------------------- children
def child_ours(spec: dict) -> dict:
    import jax

    import gptoss
    from gptoss.layers.experts import choose_strategy

    compile_events: list[float] = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, secs, **_: compile_events.append(secs) if name.startswith("/jax/core/compile/") else None)
    res = {"jax_backend": jax.default_backend(), "jax_devices": len(jax.devices()), "rss_start_bytes": rss_bytes(),
           "kernel": kernel_state(), "gptoss_path": os.path.dirname(gptoss.__file__)}
    t0 = time.perf_counter()
    model = gptoss.from_pretrained(spec["ckpt"], dtype=spec["dtype"], experts=spec["experts"], progress=False)
    res["load_s"] = time.perf_counter() - t0
    res["param_bytes"] = param_bytes(model)
    res["rss_after_load_bytes"], res["peak_after_load_bytes"] = rss_bytes(), peak_rss_bytes()
    cfg = model.config
    res["seq"] = {}
    for impl in spec["impls"]:
        for T in spec["seqs"]:
            tokens = tokens_for(T, cfg.vocab_size).astype(np.int32)
            log(f"{spec['name']}: impl={impl} T={T}")
            compile_events.clear()
            t0 = time.perf_counter()
            logits = model(tokens, moe_impl=impl).block_until_ready()
            first = time.perf_counter() - t0
            compile_s = sum(compile_events)  # trace + lower + XLA compile of everything the first call compiled
            timing = time_runs(lambda t=tokens, i=impl: model(t, moe_impl=i).block_until_ready(), spec["runs"])
            logits_np = np.asarray(logits[0], np.float32)
            entry = {"first_call_s": first, "compile_s": compile_s, **timing,
                     "tok_s": T / timing["median_s"], "top1": logits_np.argmax(-1).tolist(),
                     "auto_resolves_to": choose_strategy("auto", T, cfg.experts_per_token, cfg.num_experts),
                     "finite": bool(np.isfinite(logits_np).all()), "rss_after_bytes": rss_bytes()}
            res["seq"][f"{impl}/{T}"] = entry
            if impl == spec["impls"][0] and T == spec["save_logits_T"]:
                np.save(os.path.join(spec["logits_dir"], f"{spec['name']}.npy"), logits_np)
            log(f"{spec['name']}: impl={impl} T={T}: first {first:.2f}s, median {timing['median_s']:.3f}s "
                f"({entry['tok_s']:.1f} tok/s)")
            del logits, logits_np
    if spec["experts"] == "mxfp4":
        res["dequant_microbench"] = dequant_microbench(model, spec["dtype"])
        log(f"{spec['name']}: dequantize {res['dequant_microbench']['packed_gb_s']:.3f} GB/s of packed bytes")
    return res


def dequant_microbench(model, dtype: str, experts: int = 8) -> dict:
    """jit(dequantize) of `experts` experts of layer 0's gate_up matrix: packed bytes per second."""
    import jax
    import jax.numpy as jnp

    from gptoss.quant import dequantize

    w = model.layers[0].mlp.gate_up_EFD[...]
    b, s = w.blocks[:experts], w.scales[:experts]
    fn = jax.jit(lambda b, s: dequantize(b, s, jnp.dtype(dtype)))
    fn(b, s).block_until_ready()
    timing = time_runs(lambda: fn(b, s).block_until_ready(), 3)
    packed = int(b.nbytes + s.nbytes)
    return {"experts": experts, "packed_bytes": packed, "out_dtype": dtype, **timing,
            "packed_gb_s": packed / timing["median_s"] / 1e9}


def child_hf(spec: dict) -> dict:
    import torch
    from transformers import GptOssForCausalLM, Mxfp4Config

    torch.set_num_threads(os.cpu_count() or 1)
    res = {"torch_threads": torch.get_num_threads(), "rss_start_bytes": rss_bytes()}
    tdtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[spec["dtype"]]
    t0 = time.perf_counter()
    model = GptOssForCausalLM.from_pretrained(spec["ckpt"], quantization_config=Mxfp4Config(dequantize=True),
                                              dtype=tdtype, attn_implementation="eager")
    model.eval()
    res["load_s"] = time.perf_counter() - t0
    res["param_bytes"] = int(sum(p.numel() * p.element_size() for p in model.parameters()))
    res["experts_implementation"] = getattr(model.config, "_experts_implementation", None)
    res["expert_weight_dtype"] = str(model.model.layers[0].mlp.experts.gate_up_proj.dtype)
    res["rss_after_load_bytes"], res["peak_after_load_bytes"] = rss_bytes(), peak_rss_bytes()
    res["seq"] = {}
    vocab = model.config.vocab_size
    for impl, T in [(i, T) for i in spec["impls"] for T in spec["seqs"]]:
        if impl == "hf_eager" and model.config._experts_implementation != "eager":
            model.set_experts_implementation("eager")
            res["experts_implementation_2"] = model.config._experts_implementation
        tokens = torch.from_numpy(tokens_for(T, vocab))
        log(f"{spec['name']}: {impl} T={T}")

        def run(tokens=tokens):
            with torch.inference_mode():
                return model(input_ids=tokens, use_cache=False).logits

        t0 = time.perf_counter()
        logits = run()
        first = time.perf_counter() - t0
        timing = time_runs(run, spec["runs"])
        logits_np = logits[0].float().numpy()
        entry = {"first_call_s": first, **timing, "tok_s": T / timing["median_s"],
                 "top1": logits_np.argmax(-1).tolist(), "finite": bool(np.isfinite(logits_np).all()),
                 "rss_after_bytes": rss_bytes()}
        res["seq"][f"{impl}/{T}"] = entry
        if T == spec["save_logits_T"] and impl == "hf":
            np.save(os.path.join(spec["logits_dir"], f"{spec['name']}.npy"), logits_np)
        log(f"{spec['name']}: {impl} T={T}: first {first:.2f}s, median {timing['median_s']:.3f}s "
            f"({entry['tok_s']:.1f} tok/s)")
    return res


def child_main(spec: dict) -> None:
    res = {"name": spec["name"], "side": spec["side"], "dtype": spec["dtype"], "experts": spec.get("experts"),
           "loadavg_start": os.getloadavg()}
    res.update(child_ours(spec) if spec["side"] == "ours" else child_hf(spec))
    res["loadavg_end"] = os.getloadavg()
    child_finish(spec, res)


# ---------------------------------------------------------------------------------------------- parent
def compare(logits_dir: str, a: str, b: str) -> dict | None:
    pa, pb = (os.path.join(logits_dir, f"{n}.npy") for n in (a, b))
    if not (os.path.exists(pa) and os.path.exists(pb)):
        return None
    x, y = np.load(pa), np.load(pb)
    top5_b = np.argsort(-y, axis=-1)[:, :5]
    ax = x.argmax(-1)
    return {"top1_agree_pct": 100.0 * float(np.mean(ax == y.argmax(-1))),
            "top1_in_top5_pct": 100.0 * float(np.mean((top5_b == ax[:, None]).any(-1))),
            "max_abs_diff": float(np.abs(x - y).max()), "mean_abs_diff": float(np.abs(x - y).mean()),
            "rel_l2": float(np.linalg.norm(x - y) / np.linalg.norm(y)), "logit_std_ref": float(y.std())}


def top1_agreement(r1: dict, k1: str, r2: dict, k2: str) -> float | None:
    try:
        a, b = np.array(r1["seq"][k1]["top1"]), np.array(r2["seq"][k2]["top1"])
    except KeyError:
        return None
    return 100.0 * float(np.mean(a == b))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--seq", type=int, nargs="+", default=[128, 512], help="prefill lengths (batch 1)")
    ap.add_argument("--quick", action="store_true", help="2 layers, T=64 (overrides --layers/--seq)")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per measurement (median reported)")
    ap.add_argument("--experts", choices=["mxfp4", "dense"], default="mxfp4",
                    help="'dense': ALSO measure ours with experts dequantized at load (isolates the dequant cost)")
    ap.add_argument("--xla", action="store_true", help="also measure ours with GPTOSS_KERNELS=xla (the "
                    "pure-XLA MXFP4 path) when gptoss has the MXFP4 CPU kernel")
    ap.add_argument("--impls", default="grouped", help="comma list of our moe_impl values to time (auto=grouped "
                    "for prefill; 'dense' runs every expert on every token)")
    ap.add_argument("--scale-range", type=int, nargs=2, default=[116, 120], metavar=("LO", "HI"),
                    help="synthetic MXFP4 scale bytes (2**(s-127)); see _common.write_synthetic_hf_mxfp4")
    ap.add_argument("--mem-budget-gib", type=float, default=16.0,
                    help="skip a run whose estimated peak RSS exceeds this (or the available memory - 1 GiB); "
                    "at 6 layers hf_bf16 peaks at ~15.2 GiB, ours_bf16_dense at ~13.5, ours_fp32 at ~10.2")
    ap.add_argument("--ckpt", help="reuse this checkpoint folder instead of writing one (kept afterwards)")
    ap.add_argument("--keep", action="store_true", help="keep the written checkpoint (prints its folder)")
    ap.add_argument("--only", help="comma list of run names to do (default: all)")
    ap.add_argument("--name", help="results file name (default: forward, or forward_quick with --quick)")
    ap.add_argument("--from-json", help="only print the tables of an earlier results JSON")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child_main(json.loads(args.child))
    if args.from_json:
        with open(args.from_json) as f:
            out = json.load(f)
        args.layers, args.seq, args.runs = out["layers"], out["seqs"], out["runs"]
        impls = sorted({k.split("/")[0] for r in out["runs_info"].values() if r.get("side") == "ours"
                        for k in r.get("seq", {})})
        return report(out, args, impls)
    if args.quick:
        args.layers, args.seq = 2, [64]
    name = args.name or ("forward_quick" if args.quick else "forward")
    interrupt_on_sigterm()

    cfg = bench_config(args.layers)
    work = tempfile.mkdtemp(prefix="gptoss-bench-forward-", dir="/tmp")
    ckpt = args.ckpt or os.path.join(work, "ckpt")
    out = {"benchmark": "forward (prefill)", "machine": machine_info(), "config": cfg.to_hf(),
           "layers": args.layers, "seqs": args.seq, "runs": args.runs, "runs_info": {}}
    try:
        if not args.ckpt:
            log(f"writing a {args.layers}-layer synthetic MXFP4 checkpoint to {ckpt}")
            out["checkpoint"] = write_synthetic_hf_mxfp4(ckpt, cfg, fill="random", n_shards=2, seed=0,
                                                         scale_range=tuple(args.scale_range))
            out["checkpoint"]["scale_range"] = args.scale_range
            log(f"wrote {out['checkpoint']['total_bytes'] / 1e9:.2f} GB in {out['checkpoint']['seconds']:.1f}s")
        else:
            out["checkpoint"] = {"folder": ckpt, "reused": True}
        logits_dir = os.path.join(work, "logits")
        os.makedirs(logits_dir)
        impls = [s for s in args.impls.split(",") if s]
        xla_off = {"GPTOSS_KERNELS": "xla"}  # gptoss's pure-XLA dequantize-then-matmul path
        plan = [("ours_fp32", "ours", "float32", "mxfp4", {}), ("ours_bf16", "ours", "bfloat16", "mxfp4", {})]
        if args.xla:
            plan += [("ours_fp32_xla", "ours", "float32", "mxfp4", xla_off),
                     ("ours_bf16_xla", "ours", "bfloat16", "mxfp4", xla_off)]
        if args.experts == "dense":
            plan += [("ours_bf16_dense", "ours", "bfloat16", "dense", {}),
                     ("ours_fp32_dense", "ours", "float32", "dense", {})]
        plan += [("hf_bf16", "hf", "bfloat16", None, {}), ("hf_fp32", "hf", "float32", None, {})]
        if args.only:
            keep = set(args.only.split(","))
            plan = [p for p in plan if p[0] in keep]
        budget = int(args.mem_budget_gib * GIB)
        results = {}
        for run_name, side, dtype, experts, env in plan:
            est = estimate_peak_bytes(cfg, side, dtype, experts)
            avail = available_bytes()
            if est > budget or est > avail - GIB:
                reason = (f"estimated peak RSS {est / GIB:.1f} GiB exceeds the {args.mem_budget_gib:g} GiB budget"
                          if est > budget else f"estimated peak RSS {est / GIB:.1f} GiB > available "
                          f"{avail / GIB:.1f} GiB - 1 GiB headroom")
                log(f"skipping {run_name}: {reason}")
                results[run_name] = {"name": run_name, "skipped": reason, "est_peak_bytes": est}
                continue
            log(f"running {run_name} (estimated peak {est / GIB:.1f} GiB, available {avail / GIB:.1f} GiB)")
            spec = {"name": run_name, "side": side, "dtype": dtype, "experts": experts, "ckpt": ckpt,
                    "impls": impls if side == "ours" else ["hf", "hf_eager"], "seqs": args.seq, "runs": args.runs,
                    "save_logits_T": args.seq[0], "logits_dir": logits_dir,
                    "out": os.path.join(work, f"{run_name}.json"), "env": env}
            res = run_child(os.path.abspath(__file__), spec, timeout=3600)
            res["est_peak_bytes"] = est
            results[run_name] = res
            if "error" in res:
                log(f"{run_name} failed: {res['error']}")
        out["runs_info"] = results

        ref = results.get("hf_bf16", {})
        agreement = {}
        for rn, r in results.items():
            if rn == "hf_bf16" or "seq" not in r:
                continue
            first_key = next(iter(r["seq"]))
            agreement[rn] = {f"vs_hf_bf16_logits_T{args.seq[0]}": compare(logits_dir, rn, "hf_bf16")}
            for T in args.seq:
                k = next((k for k in r["seq"] if k.endswith(f"/{T}")), first_key)
                agreement[rn][f"top1_vs_hf_bf16_T{T}_pct"] = top1_agreement(r, k, ref, f"hf/{T}")
        if "ours_fp32" in results and "ours_bf16" in results:
            agreement["ours_bf16_vs_ours_fp32"] = compare(logits_dir, "ours_bf16", "ours_fp32")
        for rn in [r for r in results if r.startswith("ours_fp32")]:  # the tight check, when hf_fp32 fits
            agreement[f"{rn}_vs_hf_fp32"] = compare(logits_dir, rn, "hf_fp32")
        out["agreement"] = agreement
        path = write_json(name, out)
        report(out, args, impls)
        write_json(name, out)  # again, with the ratios report() adds
        print(f"\nwrote {path}")
        if args.keep and not args.ckpt:
            print(f"checkpoint kept at {ckpt}")
    finally:
        if args.keep and not args.ckpt:
            shutil.rmtree(os.path.join(work, "logits"), ignore_errors=True)
        else:
            shutil.rmtree(work, ignore_errors=True)


def report(out: dict, args, impls: list[str]) -> None:
    runs = out["runs_info"]
    ref = runs.get("hf_bf16", {})
    headers = ["run", "load s", "peak RSS GiB load/all", "params GiB", "loadavg"]
    for T in args.seq:
        headers += [f"T={T} first s", "median s", "min s", "tok/s", "GFLOP/s", "vs hf_bf16", "(by min)", "top1 %"]
    rows, notes, summary = [], [], {}
    label_ref = f"hf_bf16/{ref.get('experts_implementation')}"
    for rn, r in runs.items():
        if "skipped" in r or "error" in r:
            rows.append([rn, "skipped" if "skipped" in r else "FAILED"])
            notes.append(f"{rn}: {r.get('skipped') or r.get('error')}")
            continue
        for impl in (impls if r["side"] == "ours" else ["hf", "hf_eager"]):
            if not any(k.startswith(impl + "/") for k in r["seq"]):
                continue
            label = (f"{rn}/{impl}" if r["side"] == "ours" else
                     f"{rn}/{r.get('experts_implementation')}" if impl == "hf" else f"{rn}/eager")
            row = [label, r["load_s"], f"{r['peak_after_load_bytes'] / GIB:.2f} / {r['peak_rss_bytes'] / GIB:.2f}",
                   r["param_bytes"] / GIB, f"{r['loadavg_start'][0]:.1f}-{r['loadavg_end'][0]:.1f}"]
            for T in args.seq:
                e = r["seq"].get(f"{impl}/{T}")
                if e is None:
                    row += [None] * 8
                    continue
                ref_e = ref.get("seq", {}).get(f"hf/{T}")
                ratio = e["tok_s"] / ref_e["tok_s"] if ref_e else None
                min_ratio = ref_e["min_s"] / e["min_s"] if ref_e else None
                agree = top1_agreement(r, f"{impl}/{T}", ref, f"hf/{T}") if label != label_ref else None
                best = min((v for k, v in ref.get("seq", {}).items() if k.endswith(f"/{T}")),
                           key=lambda v: v["median_s"], default=None)
                row += [e["first_call_s"], e["median_s"], e["min_s"], e["tok_s"],
                        prefill_flops(out["config"], T) / e["median_s"] / 1e9, f"{ratio:.2f}x" if ratio else None,
                        f"{min_ratio:.2f}x" if min_ratio else None,
                        f"{agree:.1f}%" if agree is not None else None]
                if rn != "hf_bf16" and ratio:
                    summary[f"{label} T={T} prefill speed (median)"] = ratio
                    summary[f"{label} T={T} prefill speed (min)"] = min_ratio
                    summary[f"{label} T={T} prefill speed vs the faster hf_bf16 impl (median)"] = (
                        best["median_s"] / e["median_s"])
                if r["side"] == "ours":
                    if "compile_s" in e:
                        notes.append(f"{label} T={T}: compile {e['compile_s']:.1f}s (trace+lower+XLA, in the first "
                                     "call)")
            rows.append(row)
        if "load_s" in ref and rn != "hf_bf16":
            summary[f"{rn} load time (ours/hf)"] = r["load_s"] / ref["load_s"]
            summary[f"{rn} peak RSS (ours/hf)"] = r["peak_rss_bytes"] / ref["peak_rss_bytes"]
        if r.get("kernel", {}).get("present"):
            k = r["kernel"]
            notes.append(f"{rn}: CPU kernels {'ON' if k['enabled'] else 'off'} (GPTOSS_KERNELS="
                         f"{k['env'] or 'unset'}, mode {k['mode']})")
        if "dequant_microbench" in r:
            d = r["dequant_microbench"]
            notes.append(f"{rn}: jit(dequantize) of {d['experts']} experts' gate_up to {d['out_dtype']}: "
                         f"{d['packed_gb_s']:.3f} GB/s of packed bytes")
    out["ratios_vs_hf_bf16"] = summary
    m = out["machine"]
    print_table(f"Prefill, batch 1, {args.layers} layers at gpt-oss widths, MXFP4 checkpoint "
                f"({m['cpu_count']} CPUs, jax {m['versions']['jax']}, torch {m['versions']['torch']}, "
                f"transformers {m['versions']['transformers']}). 'first' = warm-up call (ours: incl. XLA compile); "
                f"median/min over {args.runs} runs; vs hf_bf16 = tok/s ratio to transformers' default experts "
                f"implementation (>1: ours faster); top1 % = greedy "
                f"top-1 agreement with hf_bf16; GFLOP/s = matmul FLOPs (projections, router, top-k experts, "
                f"logits) / median; loadavg = 1-min load at start-end of the run", headers, rows)
    for n in notes:
        print("  " + n)
    print_table("Ratios vs transformers bf16 (speed: >1 = ours faster; load time, RSS: ours/hf, <1 = ours better)",
                ["metric", "ratio"], [[k, v] for k, v in summary.items()])
    agree_rows = []
    for rn, a in out["agreement"].items():
        d = a if "_vs_" in rn else next(iter(a.values()))
        if d:
            agree_rows.append([rn, f"{d['top1_agree_pct']:.1f}%", f"{d['top1_in_top5_pct']:.1f}%", d["max_abs_diff"],
                               d["mean_abs_diff"], d["rel_l2"], d["logit_std_ref"]])
    print_table(f"Logits at T={args.seq[0]} vs hf_bf16 (rows named a_vs_b: a against b instead)",
                ["run", "top1 agree", "top1 in ref top5", "max |d|", "mean |d|", "rel L2", "ref std"], agree_rows)


if __name__ == "__main__":
    sys.exit(main())
