"""Evaluation throughput: scored tokens/s of perplexity evaluation, gptoss vs transformers on the same checkpoint,
and generative-evaluation throughput of gptoss with batching.

Part "ppl": a synthetic HF-layout MXFP4 checkpoint with gpt-oss-20b's widths and --layers layers (default 6).
Each side scores the same --docs random documents of --seq tokens (every token after the first), batch --batch:
gptoss `token_logprobs` (bf16, experts packed, the CPU kernel) vs transformers `GptOssForCausalLM` (bf16, experts
dequantized as it does on CPU; log-softmax of its logits), each in its own subprocess. The first pass (compile
included) is reported apart; the median of --runs passes gives tokens/s. Their mean NLLs must agree (bf16 rounding
aside): both score the same model. Goal: gptoss >= 1.5x.

Part "gen": gptoss batched decoding, what a generative evaluation spends its time in: decode tokens/s at batch 1
and --gen-batch (prompts of 64 tokens; the time of --gen-tokens extra decode steps, so prefill cancels out).
Goal: batch 8 >= 4x batch 1. `--parts gen` runs only this part.

    .venv/bin/python benchmarks/eval_throughput.py                     # both parts (~10 GiB RAM)
    .venv/bin/python benchmarks/eval_throughput.py --layers 2 --runs 1 # a cheaper smoke run

Results: a table on stdout and benchmarks/results/eval_throughput.json. Not a test.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np
from _common import (
    child_finish,
    interrupt_on_sigterm,
    kernel_state,
    log,
    machine_info,
    print_table,
    run_child,
    write_json,
    write_synthetic_hf_mxfp4,
)

DOC_SEED = 99


def documents(n: int, length: int, vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(DOC_SEED)
    return [rng.integers(0, vocab, length).tolist() for _ in range(n)]


def timed_passes(one, spec: dict) -> dict:
    """The first pass (compile included) apart, then the median of spec["runs"] passes as scored tokens/s."""
    t0 = time.perf_counter()
    out = {"nll": one(), "first_s": time.perf_counter() - t0, "pass_s": []}
    for _ in range(spec["runs"]):
        t0 = time.perf_counter()
        one()
        out["pass_s"].append(time.perf_counter() - t0)
    out["tok_s"] = spec["docs"] * (spec["seq"] - 1) / float(np.median(out["pass_s"]))
    return out


def child_ours(spec: dict) -> dict:
    import gptoss
    from gptoss.eval import token_logprobs

    model = gptoss.from_pretrained(spec["ckpt"], dtype="bfloat16", experts="mxfp4", progress=False)
    docs = documents(spec["docs"], spec["seq"], model.config.vocab_size)
    res = {"kernel": kernel_state()}

    def one():
        lps = token_logprobs(model, docs, seq_len=spec["seq"], batch_size=spec["batch"])
        return float(-np.mean(np.concatenate(lps)))

    if spec["ppl"]:
        res.update(timed_passes(one, spec))
    if spec.get("gen_items"):  # batched decoding: what a generative eval spends its time on
        from gptoss.engine import generate

        prompts = documents(spec["gen_items"], 64, model.config.vocab_size)
        short, long = 8, 8 + spec["gen_tokens"]
        for batch in (1, spec["gen_batch"]):
            rows = prompts[:batch]
            generate(model, rows, max_new_tokens=short, stop_tokens=[-1])  # compile
            generate(model, rows, max_new_tokens=long, stop_tokens=[-1])
            t0 = time.perf_counter()
            generate(model, rows, max_new_tokens=short, stop_tokens=[-1])
            t_short = time.perf_counter() - t0
            t0 = time.perf_counter()
            generate(model, rows, max_new_tokens=long, stop_tokens=[-1])
            step = (time.perf_counter() - t0 - t_short) / (long - short)  # prefill cancels out
            res[f"gen_batch{batch}_tok_s"] = batch / step
    return res


def child_hf(spec: dict) -> dict:
    import torch
    from transformers import GptOssForCausalLM, Mxfp4Config

    torch.set_num_threads(os.cpu_count() or 1)
    model = GptOssForCausalLM.from_pretrained(spec["ckpt"], quantization_config=Mxfp4Config(dequantize=True),
                                              dtype=torch.bfloat16, attn_implementation="eager")
    docs = torch.tensor(documents(spec["docs"], spec["seq"], model.config.vocab_size))
    res = {"torch_threads": torch.get_num_threads()}

    @torch.no_grad()
    def one():
        nll = []
        for b in range(0, len(docs), spec["batch"]):
            x = docs[b:b + spec["batch"]]
            logits = model(input_ids=x[:, :-1], use_cache=False).logits.float()
            lp = torch.log_softmax(logits, -1).gather(-1, x[:, 1:, None])[..., 0]
            nll.append(-lp.flatten())
        return float(torch.cat(nll).mean())

    res.update(timed_passes(one, spec))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--docs", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--gen-items", type=int, default=8)
    ap.add_argument("--gen-batch", type=int, default=8)
    ap.add_argument("--parts", default="ppl,gen", help="comma list of: ppl (both sides), gen (gptoss)")
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--tmp", default="/tmp")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        import json

        spec = json.loads(args.child)
        return child_finish(spec, child_ours(spec) if spec["side"] == "ours" else child_hf(spec))
    interrupt_on_sigterm()
    from gptoss import ModelConfig
    from gptoss.config import default_layer_types

    cfg = ModelConfig.gpt_oss_20b().replace(num_hidden_layers=args.layers,
                                            layer_types=default_layer_types(args.layers))
    work = tempfile.mkdtemp(prefix="gptoss-bench-eval-", dir=args.tmp)
    out = {"benchmark": "eval throughput", "machine": machine_info(), "layers": args.layers, "docs": args.docs,
           "seq": args.seq, "batch": args.batch, "runs": {}}
    try:
        ckpt = os.path.join(work, "ckpt")
        log(f"writing a {args.layers}-layer synthetic MXFP4 checkpoint")
        out["checkpoint"] = write_synthetic_hf_mxfp4(ckpt, cfg, fill="random", seed=0)
        parts = args.parts.split(",")
        for side in ("ours", "hf") if "ppl" in parts else ("ours",):
            spec = {"side": side, "ckpt": ckpt, "docs": args.docs, "seq": args.seq, "batch": args.batch,
                    "runs": args.runs if "ppl" in parts else 0, "ppl": "ppl" in parts,
                    "gen_items": args.gen_items if side == "ours" and "gen" in parts else 0,
                    "gen_batch": args.gen_batch, "gen_tokens": args.gen_tokens,
                    "out": os.path.join(work, f"{side}.json")}
            log(f"{side}: starting")
            out["runs"][side] = run_child(os.path.abspath(__file__), spec, timeout=args.timeout)
            log(f"{side}: {out['runs'][side].get('error') or 'done'}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ours, hf = out["runs"].get("ours", {}), out["runs"].get("hf", {})
    rows = [[side, f"{r['tok_s']:.1f}", f"{r['first_s']:.1f}", f"{r['nll']:.4f}"] for side, r in
            (("gptoss", ours), ("transformers", hf)) if "tok_s" in r]
    print_table(f"perplexity scoring ({args.layers} layers, {args.docs} docs x {args.seq} tokens, batch {args.batch})",
                ["side", "scored tokens/s", "first pass s", "mean NLL"], rows)
    if "tok_s" in ours and "tok_s" in hf:
        out["ratio_tok_s"] = ours["tok_s"] / hf["tok_s"]
        print(f"gptoss / transformers: {out['ratio_tok_s']:.2f}x scored tokens/s (goal >= 1.5); NLL differs by "
              f"{abs(ours['nll'] - hf['nll']) / hf['nll']:.2e} (relative)")
    for b in (1, args.gen_batch):
        if f"gen_batch{b}_tok_s" in ours:
            print(f"decoding, batch {b}: {ours[f'gen_batch{b}_tok_s']:.1f} new tokens/s")
    if "gen_batch1_tok_s" in ours and f"gen_batch{args.gen_batch}_tok_s" in ours:
        out["gen_ratio"] = ours[f"gen_batch{args.gen_batch}_tok_s"] / ours["gen_batch1_tok_s"]
        print(f"decoding batch {args.gen_batch} / batch 1: {out['gen_ratio']:.2f}x (goal >= 4 at batch 8)")
    log(f"wrote {write_json('eval_throughput', out)}")


if __name__ == "__main__":
    sys.exit(main())
