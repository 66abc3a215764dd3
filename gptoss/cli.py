"""The `gptoss` command line: generate, chat, run (config-driven experiments), info."""

from __future__ import annotations

import argparse
import sys


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint folder, hub id, 'demo' (the packaged demo model) or "
                   "'tiny' (random, on the fly)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--experts", default="auto", choices=["auto", "mxfp4", "dense"],
                   help="auto keeps the checkpoint's format; mxfp4 / dense convert")
    p.add_argument("--kernels", default=None, choices=["auto", "xla", "cpu"],
                   help="CPU kernels or pure XLA (default: $GPTOSS_KERNELS or auto)")


def _add_sampling_args(p: argparse.ArgumentParser, max_new: int) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)


def _model_spec(args):
    from gptoss.apps.loading import ModelSpec

    if args.model == "tiny":
        return ModelSpec(preset="tiny", dtype=args.dtype, experts=args.experts, kernels=args.kernels)
    return ModelSpec(path=args.model, dtype=args.dtype, experts=args.experts, kernels=args.kernels)


def cmd_generate(args) -> int:
    from gptoss.apps.inference import ChatSpec, InferenceConfig, SamplingSpec, run

    cfg = InferenceConfig(model=_model_spec(args), prompts=[args.prompt],
                          sampling=SamplingSpec(args.max_new_tokens, args.temperature, args.top_p, args.top_k,
                                                args.seed),
                          chat=ChatSpec(harmony=not args.raw, reasoning=args.reasoning), progress=False)
    item = run(cfg)["results"][0]
    if args.raw:
        print(item["completion"])
        return 0
    for m in item["messages"]:
        tag = m["channel"] or "?"
        if m["recipient"]:
            tag += f" -> {m['recipient']}"
        print(f"[{tag}] {m['text']}")
    for problem in item["problems"]:
        print(f"(harmony: {problem})", file=sys.stderr)
    return 0


def cmd_chat(args, stdin=None, stdout=None) -> int:
    from gptoss.apps.chat import chat_loop
    from gptoss.apps.loading import chat_defaults, load_model_and_tokenizer

    spec = _model_spec(args)
    model, tokenizer = load_model_and_tokenizer(spec, progress=True)
    system = chat_defaults(spec).get("system_message", True)
    return chat_loop(model, tokenizer, reasoning=args.reasoning, max_new_tokens=args.max_new_tokens,
                     temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed, system=system,
                     stdin=stdin or sys.stdin, stdout=stdout or sys.stdout)


def cmd_run(args) -> int:
    from gptoss.apps.runner import run_config

    out, results = run_config(args.config, args.overrides)
    for item in results.get("results", []):
        print(f"> {item['prompt']}")
        if item.get("messages"):
            for m in item["messages"]:
                text = m["text"].replace("\n", "\n    ")
                print(f"  [{m['channel'] or 'message'}] {text}")
        else:
            print(item.get("completion", ""))
        print()
    print(f"resolved config and results written to {out}/")
    return 0


def cmd_info(args) -> int:
    from gptoss.io import CheckpointError, open_checkpoint

    try:
        kind, cfg, index, folder = open_checkpoint(args.path)
    except CheckpointError as e:  # a user's mistake: one line, not a traceback
        print(f"gptoss info: {e}", file=sys.stderr)
        return 2
    size = sum(i.end - i.start for i in index.infos.values())
    print(f"{folder}: {kind} layout, {len(index.files)} file(s), {len(index.infos)} tensors, {size / 2**30:.2f} GiB")
    print(cfg)
    return 0


def cmd_plan(args) -> int:
    from gptoss.sharding.planner import main as plan_main

    return plan_main(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gptoss", description="gpt-oss models in JAX")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="continue one prompt (a harmony user turn unless --raw)")
    _add_model_args(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--raw", action="store_true", help="plain text continuation, no harmony formatting")
    gen.add_argument("--reasoning", default="medium", choices=["low", "medium", "high"])
    _add_sampling_args(gen, 128)

    chat = sub.add_parser("chat", help="interactive harmony chat (streaming; analysis shown apart)")
    _add_model_args(chat)
    chat.add_argument("--reasoning", default="medium", choices=["low", "medium", "high"])
    _add_sampling_args(chat, 512)

    run = sub.add_parser("run", help="run an experiment config: gptoss run CONFIG.yaml [key.sub=value ...]")
    run.add_argument("config")
    run.add_argument("overrides", nargs="*")

    info = sub.add_parser("info", help="describe a checkpoint folder without loading its weights")
    info.add_argument("path")

    plan = sub.add_parser("plan", help="per-device memory of a model on a mesh; exit 1 if a --device is too small")
    plan.add_argument("--model", required=True, help="gpt-oss-20b, gpt-oss-120b, tiny, or a checkpoint folder")
    plan.add_argument("--mesh", default="", help="axis sizes, e.g. expert=8 or data=2,expert=4,tensor=1")
    plan.add_argument("--context", type=int, default=131072, help="KV cache slots per row")
    plan.add_argument("--batch", type=int, default=1)
    plan.add_argument("--prefill", type=int, default=None, help="tokens per row in one forward (default 2048)")
    plan.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    plan.add_argument("--experts", default="mxfp4", choices=["mxfp4", "dense"])
    plan.add_argument("--device", action="append", help="e.g. h100-80gb, h200, v5e (repeatable; default: all)")
    plan.add_argument("--json", action="store_true")

    args = parser.parse_args(argv)
    return {"generate": cmd_generate, "chat": cmd_chat, "run": cmd_run, "info": cmd_info,
            "plan": cmd_plan}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
