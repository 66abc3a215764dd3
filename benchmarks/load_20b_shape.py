"""Loader memory benchmark at gpt-oss-20b's exact checkpoint shape (synthetic values).

Writes a checkpoint with gpt-oss-20b's HF tensor names, shapes and dtypes (24 layers, 32 experts, MXFP4
experts, 13,761,264,768 bytes in 3 hub-named shards + model.safetensors.index.json) into a temporary folder,
streaming one tensor at a time with a tiled random pattern, tries to drop the page cache, then in a child
process runs `gptoss.from_pretrained(dir, dtype="bfloat16", experts="mxfp4", progress=False)` and reports the
load time, the child's peak RSS, peak RSS / checkpoint bytes (target <= 1.15), the model's resident
parameter bytes, and one decode-like forward of a single token (compile timed separately).

The child passes a `place` callback (jax.device_put, exactly the default, plus measurements) that records the
RSS around every tensor, so the peak can be attributed to a tensor and to read/check/convert vs device_put.
If the ratio is over the target, a second child loads with check_finite=False to measure the NaN check's share.

    .venv/bin/python benchmarks/load_20b_shape.py [--no-forward] [--investigate]

Needs ~13 GiB of free disk under --tmp and ~16 GiB of free memory. The folder is deleted at the end, also on
error, Ctrl-C or SIGTERM. Results: a table on stdout and benchmarks/results/load_20b_shape.json. Not a test.
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
    RssSampler,
    available_bytes,
    child_finish,
    drop_page_cache,
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

CKPT_BYTES_20B = 13_761_264_768  # facts §1.3: MXFP4 experts + BF16 rest
HUB_SHARDS = [f"model-{i:05d}-of-00002.safetensors" for i in range(3)]
RATIO_TARGET = 1.15
# Measured peaks (peak RSS / checkpoint bytes), used to refuse runs the free memory cannot hold: the load
# alone ~1.15; with the 1-token forward ~1.39 (XLA's per-call scratch holds fp32 copies of bf16 weights).
LOAD_PEAK_RATIO, FORWARD_PEAK_RATIO = 1.2, 1.42


# ---------------------------------------------------------------------------------------------- child
def child_main(spec: dict) -> None:
    import jax

    import gptoss

    res: dict = {"check_finite": spec["check_finite"], "rss_baseline_bytes": rss_bytes(),
                 "loadavg_start": os.getloadavg(), "kernel": kernel_state(),
                 "gptoss_path": os.path.dirname(gptoss.__file__)}
    trace: list[dict] = []
    prev_after = [rss_bytes()]

    with RssSampler(0.005) as sampler:
        def place(x, path):
            window = sampler.window_peak()  # peak since the previous put: read + NaN check + convert of this one
            before, t0 = rss_bytes(), time.perf_counter()
            y = jax.device_put(x)
            y.block_until_ready()
            put_s = time.perf_counter() - t0
            after = rss_bytes()
            is_np = isinstance(x, np.ndarray)
            trace.append({
                "path": "/".join(map(str, path)), "nbytes": int(x.nbytes),
                "host_ptr_mod_64": int(x.ctypes.data % 64) if is_np else None,
                "zero_copy": bool(is_np and y.unsafe_buffer_pointer() == x.ctypes.data),
                "rss_prev_after": prev_after[0], "peak_before_put": window, "rss_before_put": before,
                "rss_after_put": after, "put_s": put_s,
            })
            prev_after[0] = after
            sampler.label = "after " + trace[-1]["path"]
            return y

        t0 = time.perf_counter()
        model = gptoss.from_pretrained(spec["ckpt"], dtype="bfloat16", experts="mxfp4", progress=False,
                                       check_finite=spec["check_finite"], place=place)
        res["load_s"] = time.perf_counter() - t0
        sampler.label = "after load"
    res["sampled_peak_bytes"], res["sampled_peak_label"] = sampler.peak, sampler.peak_label
    res["peak_after_load_bytes"] = peak_rss_bytes()
    res["rss_after_load_bytes"] = rss_bytes()
    res["param_bytes"] = param_bytes(model)
    res["loadavg_end_load"] = os.getloadavg()

    # Attribution: where did the peak happen, and what does each tensor leave resident?
    for t in trace:
        t["transient_bytes"] = t["peak_before_put"] - t["rss_prev_after"]
        t["put_growth_bytes"] = t["rss_after_put"] - t["rss_before_put"]
        t["retained_bytes"] = t["rss_after_put"] - t["rss_prev_after"]
    res["n_puts"] = len(trace)
    res["zero_copy_puts"] = sum(t["zero_copy"] for t in trace)
    res["zero_copy_bytes"] = sum(t["nbytes"] for t in trace if t["zero_copy"])
    res["copied_bytes"] = sum(t["nbytes"] for t in trace if not t["zero_copy"])
    res["host_ptr_mod_64_counts"] = {str(k): sum(t["host_ptr_mod_64"] == k for t in trace)
                                     for k in sorted({t["host_ptr_mod_64"] for t in trace}, key=str)}
    res["retained_total_bytes"] = sum(t["retained_bytes"] for t in trace)
    res["device_put_total_s"] = sum(t["put_s"] for t in trace)
    top = sorted(trace, key=lambda t: t["peak_before_put"], reverse=True)[:6]
    res["top_peaks"] = top
    res["trace_large"] = [t for t in trace if t["nbytes"] >= 64 * 1024**2 or t in top]

    if spec["forward"]:
        compile_events: list[float] = []
        jax.monitoring.register_event_duration_secs_listener(
            lambda name, secs, **_: compile_events.append(secs) if name.startswith("/jax/core/compile/") else None)
        tokens = np.array([[min(200006, model.config.vocab_size - 1)]], np.int32)  # <|start|>
        t0 = time.perf_counter()
        model(tokens).block_until_ready()
        res["decode_first_call_s"] = time.perf_counter() - t0
        res["decode_compile_s"] = sum(compile_events)
        timing = time_runs(lambda: model(tokens).block_until_ready(), spec["runs"])
        res["decode"] = timing
        res["decode_xla_memory"] = xla_memory(model, tokens)
        res["decode_moe_impl"] = "auto -> gather (1 token x top-4 < 32 experts)"
        res["peak_after_forward_bytes"] = peak_rss_bytes()
    res["loadavg_end"] = os.getloadavg()
    child_finish(spec, res)


def xla_memory(model, tokens) -> dict:
    """XLA's own memory analysis of the compiled forward (temp = scratch it allocates, and page-faults, per call).

    Uses gptoss's private jitted forward (the one `model(tokens)` runs); returns {} if that changes."""
    try:
        import jax.numpy as jnp
        from flax import nnx

        from gptoss.model.gpt_oss import _jit_forward

        graphdef, state = nnx.split(model)
        ma = _jit_forward.lower(graphdef, state, jnp.asarray(tokens), None, False, None).compile().memory_analysis()
        return {k: int(getattr(ma, k)) for k in ("temp_size_in_bytes", "argument_size_in_bytes",
                                                 "output_size_in_bytes", "alias_size_in_bytes")}
    except Exception as e:  # noqa: BLE001 - diagnostics only
        return {"error": f"{type(e).__name__}: {e}"}


# ---------------------------------------------------------------------------------------------- parent
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tmp", default="/tmp", help="where the temporary checkpoint folder goes")
    ap.add_argument("--no-forward", action="store_true", help="skip the 1-token forward")
    ap.add_argument("--no-drop-cache", action="store_true", help="do not try to drop the page cache")
    ap.add_argument("--investigate", action="store_true",
                    help="always do the second load with check_finite=False (default: only when over target)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--wait-mem", type=float, default=900,
                    help="seconds to wait for enough free memory before giving up (the machine may be shared)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child_main(json.loads(args.child))
    interrupt_on_sigterm()

    from gptoss import ModelConfig

    cfg = ModelConfig.gpt_oss_20b()
    free_disk = shutil.disk_usage(args.tmp).free
    if free_disk < CKPT_BYTES_20B + 2 * GIB:
        sys.exit(f"need {(CKPT_BYTES_20B + 2 * GIB) / GIB:.1f} GiB free under {args.tmp}, have {free_disk / GIB:.1f}")
    out: dict = {"benchmark": "load at gpt-oss-20b shape", "machine": machine_info(), "config": cfg.to_hf(),
                 "ratio_target": RATIO_TARGET}
    work = tempfile.mkdtemp(prefix="gptoss-20b-shape-", dir=args.tmp)
    ckpt = os.path.join(work, "ckpt")
    try:
        log(f"writing the 20b-shape synthetic checkpoint to {ckpt}")
        info = write_synthetic_hf_mxfp4(ckpt, cfg, fill="tiled", n_shards=3, seed=0)
        out["checkpoint"] = info
        assert info["total_bytes"] == CKPT_BYTES_20B, (info["total_bytes"], CKPT_BYTES_20B)
        assert info["files"] == HUB_SHARDS, info["files"]
        on_disk = sum(os.path.getsize(os.path.join(ckpt, f)) for f in info["files"])
        assert on_disk == info["file_bytes"]
        log(f"wrote {info['total_bytes']:,} tensor bytes ({on_disk:,} with headers) in {info['seconds']:.0f}s")

        def load(check_finite: bool, forward: bool, tag: str) -> dict:
            if args.no_drop_cache:
                out[f"drop_cache_{tag}"] = {"worked": False, "message": "not tried (--no-drop-cache)"}
            else:
                ok, msg = drop_page_cache()
                out[f"drop_cache_{tag}"] = {"worked": ok, "message": msg}
                log(f"drop page cache: {msg}")
            need = int(CKPT_BYTES_20B * LOAD_PEAK_RATIO + GIB)
            avail, deadline = available_bytes(), time.monotonic() + args.wait_mem
            while avail < need and time.monotonic() < deadline:  # a shared machine: wait for others to finish
                log(f"waiting for memory: {avail / GIB:.1f} GiB available, {need / GIB:.1f} needed")
                time.sleep(15)
                avail = available_bytes()
            if avail < need:
                raise SystemExit(f"only {avail / GIB:.1f} GiB available, the load needs about {need / GIB:.1f}")
            need_fwd = int(CKPT_BYTES_20B * FORWARD_PEAK_RATIO + GIB)
            if forward and avail < need_fwd:
                out["forward_skipped"] = (f"available memory {avail / GIB:.1f} GiB < {need_fwd / GIB:.1f} GiB, the "
                                          f"measured peak of load + 1-token forward (+1 GiB headroom)")
                log(f"skipping the forward: {out['forward_skipped']}")
                forward = False
            log(f"loading in a child (check_finite={check_finite}); available memory {avail / GIB:.1f} GiB")
            spec = {"ckpt": ckpt, "check_finite": check_finite, "forward": forward, "runs": args.runs,
                    "out": os.path.join(work, f"result_{tag}.json")}
            res = run_child(os.path.abspath(__file__), spec, timeout=3600)
            res["available_before_bytes"] = avail
            if "error" in res:
                raise RuntimeError(f"load child failed: {res['error']}")
            res["peak_ratio"] = res["peak_rss_bytes"] / CKPT_BYTES_20B
            res["peak_over_baseline_ratio"] = (res["peak_rss_bytes"] - res["rss_baseline_bytes"]) / CKPT_BYTES_20B
            log(f"load {res['load_s']:.1f}s, peak RSS {res['peak_rss_bytes'] / GIB:.2f} GiB "
                f"(ratio {res['peak_ratio']:.3f})")
            return res

        main_res = load(True, not args.no_forward, "default")
        out["load"] = main_res
        if args.investigate or main_res["peak_ratio"] > RATIO_TARGET:
            out["load_check_finite_false"] = load(False, False, "no_check")
        write_json("load_20b_shape", out)
        report(out)
        print(f"\nwrote {write_json('load_20b_shape', out)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        log(f"removed {work}")


def report(out: dict) -> None:
    m, r = out["machine"], out["load"]
    gib = lambda b: b / GIB  # noqa: E731
    total = out["checkpoint"]["total_bytes"]
    over_base = (r["peak_after_load_bytes"] - r["rss_baseline_bytes"]) / CKPT_BYTES_20B
    rows = [
        ["checkpoint tensor bytes", f"{total:,} ({gib(total):.2f} GiB)"],
        ["checkpoint write time s", out["checkpoint"]["seconds"]],
        ["page cache dropped before load", f"{out['drop_cache_default']['worked']} "
                                           f"({out['drop_cache_default']['message']})"],
        ["load time s", r["load_s"]],
        ["child RSS before load GiB", gib(r["rss_baseline_bytes"])],
        ["child peak RSS during load GiB (VmHWM)", gib(r["peak_after_load_bytes"])],
        ["peak RSS / checkpoint bytes", f"{r['peak_after_load_bytes'] / CKPT_BYTES_20B:.3f} "
                                        f"(target <= {RATIO_TARGET})"],
        ["(peak - baseline) / checkpoint bytes", f"{over_base:.3f}"],
        ["sampled peak at", r["sampled_peak_label"]],
        ["time in device_put (copies) s", r["device_put_total_s"]],
        ["RSS after load GiB", gib(r["rss_after_load_bytes"])],
        ["model parameter bytes (sum of leaves)", f"{r['param_bytes']:,} ({gib(r['param_bytes']):.2f} GiB)"],
        ["device_put zero-copy / total", f"{r['zero_copy_puts']} / {r['n_puts']} "
                                         f"(host ptr %64 counts {r['host_ptr_mod_64_counts']})"],
    ]
    if "forward_skipped" in out:
        rows.append(["1-token forward", "skipped: " + out["forward_skipped"]])
    if "decode" in r:
        k = r.get("kernel", {})
        rows += [["MXFP4 CPU kernel for the forward", ("ON" if k.get("enabled") else "off") if k.get("present")
                  else "not in this gptoss"],
                 ["1-token forward first call s (incl. compile)", r["decode_first_call_s"]],
                 ["  of which compile s (trace+lower+XLA)", r["decode_compile_s"]],
                 ["1-token forward median s", f"{r['decode']['median_s']:.3f} ({1 / r['decode']['median_s']:.2f} tok/s;"
                                              f" CPU {r['decode']['median_cpu_s']:.2f}s)"],
                 ["1-token forward minor page faults / call", r["decode"]["rusage"][-1]["minor_faults"]],
                 ["1-token forward XLA temp buffer GiB", gib(r["decode_xla_memory"].get("temp_size_in_bytes", 0))],
                 ["peak RSS incl. forward GiB", gib(r["peak_after_forward_bytes"])],
                 ["peak RSS incl. forward / checkpoint bytes", f"{r['peak_after_forward_bytes'] / CKPT_BYTES_20B:.3f}"]]
    rows.append(["child peak RSS overall GiB", gib(r["peak_rss_bytes"])])
    rows.append(["loadavg (1 min) start / end", f"{r['loadavg_start'][0]:.1f} / {r['loadavg_end'][0]:.1f}"])
    nc = out.get("load_check_finite_false")
    if nc:
        rows += [["[check_finite=False] load time s", nc["load_s"]],
                 ["[check_finite=False] peak RSS GiB", gib(nc["peak_after_load_bytes"])],
                 ["[check_finite=False] peak / checkpoint bytes",
                  f"{nc['peak_after_load_bytes'] / CKPT_BYTES_20B:.3f}"]]
    print_table(f"gptoss.from_pretrained at gpt-oss-20b shape (bf16, experts mxfp4; {m['cpu_count']} CPUs, "
                f"jax {m['versions']['jax']})", ["metric", "value"], rows)
    print_table("Largest per-tensor RSS peaks (peak before put = during read + NaN check + convert; GiB)",
                ["tensor", "MiB", "RSS prev", "peak before put", "transient", "RSS after put", "retained", "zero-copy"],
                [[t["path"], t["nbytes"] / 2**20, gib(t["rss_prev_after"]), gib(t["peak_before_put"]),
                  gib(t["transient_bytes"]), gib(t["rss_after_put"]), gib(t["retained_bytes"]), t["zero_copy"]]
                 for t in r["top_peaks"]])


if __name__ == "__main__":
    sys.exit(main())
