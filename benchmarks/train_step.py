"""LoRA train-step benchmark: gptoss (MXFP4 experts packed and frozen) vs transformers + peft, same checkpoint.

Part 1 ("bench"): a synthetic HF-layout MXFP4 checkpoint with gpt-oss-20b's widths (hidden 2880, 64/8 heads, 32
experts top-4, vocab 201088) and --layers layers. One LoRA step (rank 8, alpha 16, on attention q/k/v/o and on the
experts' gate_up/down; AdamW; batch 1 x --seq tokens; next-token loss over every token) on each side, each in its
own subprocess: the first step (ours: includes the XLA compile, reported apart), then the median of --runs steps
as tokens/s, and the child's peak RSS. transformers loads the experts dequantized to bf16 (what it does on CPU)
and peft reaches them with `target_parameters` (mlp.experts.gate_up_proj / down_proj). Both start from
zero-initialised B matrices, so their first losses must agree (bf16 rounding aside): a check that both sides
train the same model.

Part 2 ("20b"): gpt-oss-20b's exact shape (24 layers, the 12.8 GiB synthetic checkpoint of load_20b_shape.py):
one LoRA step at --seq on ours (remat per layer; one timed step after the first), peak RSS / checkpoint bytes
(goal <= 1.35). transformers + peft is not run: with
experts dequantized to bf16 the model alone is ~39 GiB.

    .venv/bin/python benchmarks/train_step.py                 # both parts (needs ~14 GiB free disk, ~20 GiB RAM)
    .venv/bin/python benchmarks/train_step.py --parts bench --layers 2 --runs 1   # a cheaper smoke run

A child over --mem-budget-gib stops itself (reported as such) instead of waking the OOM killer. Results: a table
on stdout and benchmarks/results/train_step.json. Needs peft (`pip install -e .[bench]`). Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time

import numpy as np
from _common import (
    GIB,
    RssSampler,
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
    write_json,
    write_synthetic_hf_mxfp4,
)

RANK, ALPHA, LR, TOKEN_SEED = 8, 16.0, 1e-4, 4321
RSS_GOAL_20B = 1.35


def batch_tokens(T: int, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    t = np.random.default_rng(TOKEN_SEED).integers(0, vocab, size=(1, T + 1), dtype=np.int64)
    return t[:, :-1], t[:, 1:]


def memory_guard(budget_bytes: int) -> None:
    """Ends this child (exit 3) when its RSS passes the budget, before the kernel's OOM killer picks a victim."""
    def watch():
        while True:
            if rss_bytes() > budget_bytes:
                print(f"over the memory budget ({budget_bytes / GIB:.1f} GiB): stopping", file=sys.stderr, flush=True)
                os._exit(3)
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()


# ---------------------------------------------------------------------------------------------- children
def child_ours(spec: dict) -> dict:
    import jax

    import gptoss
    from gptoss.train import LoraConfig, LossConfig, OptimConfig, Trainer, add_lora

    compile_events: list[float] = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, secs, **_: compile_events.append(secs) if name.startswith("/jax/core/compile/") else None)
    res = {"kernel": kernel_state(), "jax_backend": jax.default_backend()}
    with RssSampler(0.01) as sampler:
        t0 = time.perf_counter()
        model = gptoss.from_pretrained(spec["ckpt"], dtype="bfloat16", experts="mxfp4", progress=False)
        res["load_s"] = time.perf_counter() - t0
        res["param_bytes"] = param_bytes(model)
        model.remat = spec["remat"]
        add_lora(model, LoraConfig(rank=RANK, alpha=ALPHA, targets=("q", "k", "v", "o", "experts")))
        trainer = Trainer(model, "lora", OptimConfig(learning_rate=LR, weight_decay=0.0), LossConfig())
        res["trainable_params"] = int(sum(x.size for x in jax.tree.leaves(trainer.params)))
        inputs, targets = batch_tokens(spec["seq"], model.config.vocab_size)
        batch = {"inputs": inputs.astype(np.int32), "targets": targets.astype(np.int32),
                 "weights": np.ones(targets.shape, np.float32)}
        state = trainer.init()
        sampler.label = "first step"
        t0 = time.perf_counter()
        state, m = trainer.step(state, batch)
        res["first_loss"] = float(m["nll"])
        res["first_step_s"] = time.perf_counter() - t0
        log(f"{spec['name']}: first step {res['first_step_s']:.1f} s, loss {res['first_loss']:.4f}")
        res["compile_s"] = sum(compile_events)
        sampler.label = "steps"
        times = []
        for _ in range(spec["runs"]):
            t0 = time.perf_counter()
            state, m = trainer.step(state, batch)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t0)
        res["last_loss"] = float(m["nll"])
    res.update(step_s=times, median_step_s=float(np.median(times)), tok_s=spec["seq"] / float(np.median(times)),
               sampled_peak_bytes=sampler.peak, sampled_peak_label=sampler.peak_label)
    return res


def child_hf(spec: dict) -> dict:
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import GptOssForCausalLM, Mxfp4Config

    torch.set_num_threads(os.cpu_count() or 1)
    res = {"torch_threads": torch.get_num_threads()}
    with RssSampler(0.01) as sampler:
        t0 = time.perf_counter()
        model = GptOssForCausalLM.from_pretrained(spec["ckpt"], quantization_config=Mxfp4Config(dequantize=True),
                                                  dtype=torch.bfloat16, attn_implementation="eager")
        res["load_s"] = time.perf_counter() - t0
        res["param_bytes"] = int(sum(p.numel() * p.element_size() for p in model.parameters()))
        res["expert_weight_dtype"] = str(model.model.layers[0].mlp.experts.gate_up_proj.dtype)
        cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                         target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
        model = get_peft_model(model, cfg)
        params = [p for p in model.parameters() if p.requires_grad]
        res["trainable_params"] = int(sum(p.numel() for p in params))
        opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0, betas=(0.9, 0.95))
        inputs, targets = (torch.from_numpy(x) for x in batch_tokens(spec["seq"], model.config.vocab_size))

        def step():
            opt.zero_grad(set_to_none=True)
            logits = model(input_ids=inputs, use_cache=False).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            return float(loss)

        sampler.label = "first step"
        t0 = time.perf_counter()
        res["first_loss"] = step()
        res["first_step_s"] = time.perf_counter() - t0
        log(f"{spec['name']}: first step {res['first_step_s']:.1f} s, loss {res['first_loss']:.4f}")
        sampler.label = "steps"
        times = []
        for _ in range(spec["runs"]):
            t0 = time.perf_counter()
            res["last_loss"] = step()
            times.append(time.perf_counter() - t0)
    res.update(step_s=times, median_step_s=float(np.median(times)), tok_s=spec["seq"] / float(np.median(times)),
               sampled_peak_bytes=sampler.peak, sampled_peak_label=sampler.peak_label)
    return res


def child_main(spec: dict) -> None:
    memory_guard(int(spec["budget_bytes"]))
    res = {"name": spec["name"], "loadavg_start": os.getloadavg()}
    res.update(child_ours(spec) if spec["side"] == "ours" else child_hf(spec))
    res["loadavg_end"] = os.getloadavg()
    res["peak_rss_bytes_child"] = peak_rss_bytes()
    child_finish(spec, res)


# ---------------------------------------------------------------------------------------------- parent
def bench_config(layers: int):
    from gptoss import ModelConfig
    from gptoss.config import default_layer_types

    return ModelConfig.gpt_oss_20b().replace(num_hidden_layers=layers, layer_types=default_layer_types(layers))


def run_part(name: str, cfg, sides: list[str], args, work: str) -> dict:
    ckpt = os.path.join(work, name)
    shards = 3 if cfg.num_hidden_layers >= 12 else 1
    log(f"{name}: writing a {cfg.num_hidden_layers}-layer synthetic MXFP4 checkpoint")
    info = write_synthetic_hf_mxfp4(ckpt, cfg, fill="tiled" if shards > 1 else "random", n_shards=shards, seed=0)
    part = {"layers": cfg.num_hidden_layers, "seq": args.seq, "checkpoint": info, "runs": {}}
    try:
        for side in sides:
            runs = 1 if name == "20b" else args.runs  # a 20b-shape step takes minutes on a CPU
            spec = {"name": f"{name}/{side}", "side": side, "ckpt": ckpt, "seq": args.seq, "runs": runs,
                    "remat": name == "20b", "budget_bytes": args.mem_budget_gib * GIB,
                    "out": os.path.join(work, f"{name}-{side}.json")}
            log(f"{spec['name']}: starting")
            part["runs"][side] = r = run_child(os.path.abspath(__file__), spec, timeout=args.timeout)
            if r.get("child_wall_s") and "error" in r and "exited with 3" in r["error"]:
                r["error"] = f"stopped at the memory budget ({args.mem_budget_gib} GiB)"
            log(f"{spec['name']}: {r.get('error') or 'done'} ({r['child_wall_s']} s)")
    finally:
        shutil.rmtree(ckpt, ignore_errors=True)
    return part


def report(out: dict) -> None:
    rows = []
    for name, part in out["parts"].items():
        ckpt_bytes = part["checkpoint"]["total_bytes"]
        for side, r in part["runs"].items():
            if "error" in r:
                rows.append([name, side, r["error"], "", "", "", "", ""])
                continue
            peak = r["peak_rss_bytes"]
            rows.append([name, side, f"{r['tok_s']:.2f}", f"{r['median_step_s']:.1f}", f"{r['first_step_s']:.1f}",
                         f"{peak / GIB:.2f}", f"{peak / ckpt_bytes:.2f}", f"{r['first_loss']:.4f}"])
    print_table("LoRA train step (batch 1, rank 8 on q/k/v/o + experts)",
                ["part", "side", "tokens/s", "step s", "first step s", "peak RSS GiB", "peak/ckpt", "first loss"],
                rows)
    bench = out["parts"].get("bench", {}).get("runs", {})
    ours, hf = bench.get("ours", {}), bench.get("hf", {})
    if "tok_s" in ours and "tok_s" in hf:
        ratio = {"tok_s_ours_over_hf": ours["tok_s"] / hf["tok_s"],
                 "peak_rss_ours_over_hf": ours["peak_rss_bytes"] / hf["peak_rss_bytes"],
                 "first_loss_rel_diff": abs(ours["first_loss"] - hf["first_loss"]) / abs(hf["first_loss"])}
        out["ratios"] = ratio
        print(f"ours / transformers+peft: {ratio['tok_s_ours_over_hf']:.2f}x tokens/s (goal >= 1), "
              f"{ratio['peak_rss_ours_over_hf']:.2f}x peak RSS (goal <= 0.6); first losses differ by "
              f"{ratio['first_loss_rel_diff']:.2e} (relative)")
    big = out["parts"].get("20b", {})
    if "peak_rss_bytes" in big.get("runs", {}).get("ours", {}):
        ratio = big["runs"]["ours"]["peak_rss_bytes"] / big["checkpoint"]["total_bytes"]
        out["ratio_20b_peak_over_ckpt"] = ratio
        print(f"gpt-oss-20b shape: peak RSS / checkpoint bytes {ratio:.2f} (goal <= {RSS_GOAL_20B})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="bench,20b", help="comma list of: bench, 20b")
    ap.add_argument("--layers", type=int, default=6, help="layers of the bench checkpoint")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--runs", type=int, default=2, help="timed steps after the first (median reported)")
    ap.add_argument("--sides", default="ours,hf", help="bench sides: ours, hf")
    ap.add_argument("--mem-budget-gib", type=float, default=21.0)
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--tmp", default="/tmp")
    ap.add_argument("--name", default="train_step", help="results file name")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child_main(json.loads(args.child))
    interrupt_on_sigterm()
    work = tempfile.mkdtemp(prefix="gptoss-bench-train-", dir=args.tmp)
    out = {"benchmark": "LoRA train step", "machine": machine_info(), "seq": args.seq, "rank": RANK, "parts": {}}
    try:
        parts = args.parts.split(",")
        if "bench" in parts:
            out["parts"]["bench"] = run_part("bench", bench_config(args.layers), args.sides.split(","), args, work)
        if "20b" in parts:
            from gptoss import ModelConfig

            out["parts"]["20b"] = run_part("20b", ModelConfig.gpt_oss_20b(), ["ours"], args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(out)
    log(f"wrote {write_json(args.name, out)}")


if __name__ == "__main__":
    main()
