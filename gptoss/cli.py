"""The `gptoss` command line: generate, chat, run (config-driven experiments), info, plan.

One error boundary (`main`): a user's mistake (a bad flag, file, config key or value) prints what was wrong and
where in a line or two and exits with 2; anything else is a failed run (exit 1) with a one-line summary. `--debug`
(or GPTOSS_DEBUG=1) shows the traceback instead."""

from __future__ import annotations

import argparse
import os
import sys
import traceback

EXIT_USAGE, EXIT_FAILED = 2, 1


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint folder, hub id, 'demo' (the packaged demo model) or "
                   "'tiny' (random, on the fly)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--experts", default="auto", choices=["auto", "mxfp4", "dense"],
                   help="auto keeps the checkpoint's format; mxfp4 / dense convert")
    p.add_argument("--kernels", default=None, choices=["auto", "xla", "cpu", "pallas"],
                   help="CPU kernels, Pallas GPU kernels or pure XLA (default: $GPTOSS_KERNELS or auto)")
    p.add_argument("--gemv-input", default=None, choices=["x16", "x8", "exact"],
                   help="what the CPU kernels' decode GEMV multiplies: x16 (15-bit blocks, the default), x8 (8-bit "
                        "blocks as llama.cpp: faster, less exact) or exact fp32")
    p.add_argument("--dense-weights", default="auto", choices=["auto", "bf16", "bf12"],
                   help="attention and unembedding weights: bf16, or bf12 (lossless, 77 %% of the bytes: faster CPU "
                        "decode); auto: bf12 where this CPU decodes it fast and has no AMX")


def _add_sampling_args(p: argparse.ArgumentParser, max_new: int) -> None:
    p.add_argument("--max-new-tokens", type=_positive_int, default=max_new)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)


def _model_spec(args):
    from gptoss.apps.loading import ModelSpec

    common = dict(dtype=args.dtype, experts=args.experts, kernels=args.kernels,
                  gemv_input=getattr(args, "gemv_input", None), dense_weights=getattr(args, "dense_weights", "auto"))
    if args.model == "tiny":
        return ModelSpec(preset="tiny", **common)
    return ModelSpec(path=args.model, **common)


def _note_random(args) -> None:
    if args.model == "tiny":
        print("note: 'tiny' is a random, untrained model built on the fly: its output is noise. Try --model demo "
              "(a small trained model) or a real checkpoint.", file=sys.stderr)


def cmd_generate(args) -> int:
    from gptoss.apps.chat import printable
    from gptoss.apps.inference import ChatSpec, InferenceConfig, SamplingSpec, run

    cfg = InferenceConfig(model=_model_spec(args), prompts=[args.prompt],
                          sampling=SamplingSpec(args.max_new_tokens, args.temperature, args.top_p, args.top_k,
                                                args.seed),
                          chat=ChatSpec(harmony=not args.raw, reasoning=args.reasoning),
                          progress=sys.stderr.isatty())  # loading and token bars (after a second) on a terminal
    _note_random(args)
    result = run(cfg)
    item = result["results"][0]
    if args.raw:
        print(printable(item["completion"]))
        return 0
    for m in item["messages"]:
        tag = m["channel"] or "message"
        if m["recipient"]:
            tag += f" -> {m['recipient']}"
        print(f"[{printable(tag)}] {printable(m['text'])}")  # the header too is the model's output
    if item["problems"]:
        if not item["messages"]:  # nothing parsed: show what the model produced
            print(f"[raw] {printable(item['completion'])}")
        for problem in item["problems"]:
            print(f"(harmony: {problem})", file=sys.stderr)
    if not item["finished"]:
        print(f"(stopped at --max-new-tokens {args.max_new_tokens} before the model finished)", file=sys.stderr)
    seconds = result["generate_seconds_incl_compile"]
    if seconds > 1.0:
        print(f"({item['new_tokens']} tokens in {seconds:.1f} s, compile included)", file=sys.stderr)
    return 0


def cmd_chat(args, stdin=None, stdout=None) -> int:
    from gptoss.apps.chat import chat_loop
    from gptoss.apps.loading import chat_defaults, load_model_and_tokenizer

    spec = _model_spec(args)
    _note_random(args)
    model, tokenizer = load_model_and_tokenizer(spec, progress=True)
    system = chat_defaults(spec).get("system_message", True)
    return chat_loop(model, tokenizer, reasoning=args.reasoning, max_new_tokens=args.max_new_tokens,
                     temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed, system=system,
                     stdin=stdin or sys.stdin, stdout=stdout or sys.stdout)


def cmd_run(args) -> int:
    from gptoss.apps.chat import printable
    from gptoss.apps.runner import run_config

    out, results = run_config(args.config, args.overrides)
    for item in results.get("results", []):
        print(f"> {item['prompt']}")
        if item.get("messages"):
            for m in item["messages"]:
                text = printable(m["text"]).replace("\n", "\n    ")
                print(f"  [{printable(m['channel'] or 'message')}] {text}")
        else:
            print(printable(item.get("completion", "")))
        print()
    print(f"resolved config and results written to {out}/")
    return 0


def cmd_info(args) -> int:
    from gptoss.io import open_checkpoint

    kind, cfg, index, folder = open_checkpoint(args.path)
    size = sum(i.end - i.start for i in index.infos.values())
    packed = any(name.endswith(("_blocks", ".blocks")) for name in index.infos)
    rows = [("checkpoint", f"{folder} ({kind} layout)"),
            ("files / tensors", f"{len(index.files)} / {len(index.infos)}, {_size(size)}"),
            ("experts", "MXFP4 (packed)" if packed else "dense"),
            ("parameters", f"{cfg.num_params() / 1e9:.2f} B" if cfg.num_params() >= 1e8 else f"{cfg.num_params():,}"),
            ("layers", f"{cfg.num_hidden_layers} ({_layer_pattern(cfg.layer_types)})"),
            ("hidden / intermediate", f"{cfg.hidden_size} / {cfg.intermediate_size}"),
            ("heads (q / kv) x dim", f"{cfg.num_attention_heads} / {cfg.num_key_value_heads} x {cfg.head_dim}"),
            ("experts (top-k)", f"{cfg.num_experts} ({cfg.experts_per_token} per token)"),
            ("sliding window", str(cfg.sliding_window)),
            ("vocabulary", f"{cfg.vocab_size:,}"),
            ("context", f"{cfg.max_position_embeddings:,} ({cfg.rope_type} RoPE, theta {cfg.rope_theta:g}, factor "
                        f"{cfg.rope_scaling_factor:g} over {cfg.initial_context_length:,})"),
            ("eos / pad ids", f"{cfg.eos_token_id} / {cfg.pad_token_id}")]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    return 0


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _layer_pattern(types: tuple[str, ...]) -> str:
    """'sliding, full alternating' for gpt-oss's pattern, else the counts."""
    short = [t.replace("_attention", "") for t in types]
    if len(short) >= 2 and all(t == short[i % 2] for i, t in enumerate(short)) and short[0] != short[1]:
        return f"{short[0]}, {short[1]} alternating"
    return ", ".join(f"{short.count(t)} {t}" for t in dict.fromkeys(short))


def cmd_plan(args) -> int:
    from gptoss.sharding.planner import main as plan_main

    return plan_main(args)


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that report a user's mistake (our own error types, bad values, missing files)."""
    from gptoss.config import ConfigError
    from gptoss.harmony import HarmonyFormatError
    from gptoss.io import CheckpointError
    from gptoss.runconfig import RunConfigError
    from gptoss.sharding import ShardingError
    from gptoss.tokenizer import TokenizerError

    return (ConfigError, CheckpointError, RunConfigError, ShardingError, TokenizerError, HarmonyFormatError,
            ValueError, TypeError, OSError, ImportError)


def _one_line(e: BaseException) -> str:
    """The error's own message, without the notes JAX appends to filtered tracebacks."""
    text = str(e).strip() or type(e).__name__
    for marker in ("\n--------------------\nFor simplicity, JAX has removed", "\nThe stack trace below excludes"):
        text = text.split(marker)[0].strip()
    text = " ".join(text.split())  # one line
    if isinstance(e, ImportError) and getattr(e, "name", None):
        text = f"{text} (an optional dependency: see the README's install section)"
    return text


def main(argv: list[str] | None = None) -> int:
    """Runs one command; returns its exit status (0, 1: the run failed, 2: a usage mistake)."""
    parser = _parser()
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("GPTOSS_DEBUG", "") not in ("", "0")
    if debug:
        return _COMMANDS[args.command](args)
    try:
        return _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("gptoss: interrupted", file=sys.stderr)
        return 130
    except _user_errors() as e:
        print(f"gptoss {args.command}: error: {_one_line(e)}", file=sys.stderr)
        print("(run with --debug for the traceback)", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:  # noqa: BLE001 - the boundary: a failed run is one line unless --debug
        frame = traceback.extract_tb(e.__traceback__)[-1]
        print(f"gptoss {args.command}: failed: {type(e).__name__}: {_one_line(e)} "
              f"(at {os.path.basename(frame.filename)}:{frame.lineno})", file=sys.stderr)
        print("(run with --debug for the traceback)", file=sys.stderr)
        return EXIT_FAILED


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    from gptoss import __version__

    parser = argparse.ArgumentParser(prog="gptoss", description="gpt-oss models in JAX")
    parser.add_argument("--version", action="version", version=f"gptoss {__version__}")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks (also: GPTOSS_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)  # --debug after the command works too
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    gen = sub.add_parser("generate", parents=[common],
                         help="continue one prompt (a harmony user turn unless --raw)")
    _add_model_args(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--raw", action="store_true", help="plain text continuation, no harmony formatting")
    gen.add_argument("--reasoning", default="medium", choices=["low", "medium", "high"])
    _add_sampling_args(gen, 256)

    chat = sub.add_parser("chat", parents=[common], help="interactive harmony chat (streaming; analysis shown apart)")
    _add_model_args(chat)
    chat.add_argument("--reasoning", default="medium", choices=["low", "medium", "high"])
    _add_sampling_args(chat, 512)

    run = sub.add_parser("run", parents=[common],
                         help="run an experiment config: gptoss run CONFIG.yaml [key.sub=value ...]")
    run.add_argument("config")
    run.add_argument("overrides", nargs="*")

    info = sub.add_parser("info", parents=[common], help="describe a checkpoint folder without loading its weights")
    info.add_argument("path")

    plan = sub.add_parser("plan", parents=[common],
                          help="per-device memory of a model on a mesh; exit 1 if a --device is too small")
    plan.add_argument("--model", required=True, help="gpt-oss-20b, gpt-oss-120b, tiny, or a checkpoint folder")
    plan.add_argument("--mesh", default="", help="axis sizes, e.g. expert=8 or data=2,expert=4,tensor=1")
    plan.add_argument("--context", type=_positive_int, default=8192,
                      help="KV cache slots per row (default 8192; gpt-oss supports up to 131072)")
    plan.add_argument("--batch", type=_positive_int, default=1)
    plan.add_argument("--prefill", type=int, default=None, help="tokens per row in one forward (default 2048)")
    plan.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    plan.add_argument("--experts", default="mxfp4", choices=["mxfp4", "dense"])
    plan.add_argument("--device", action="append", help="e.g. h100-80gb, h200, v5e (repeatable; default: all)")
    plan.add_argument("--json", action="store_true")

    return parser


_COMMANDS = {"generate": cmd_generate, "chat": cmd_chat, "run": cmd_run, "info": cmd_info, "plan": cmd_plan}


if __name__ == "__main__":
    sys.exit(main())
