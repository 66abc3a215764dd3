"""GPU benchmark for a lent accelerator: gptoss vs transformers at gpt-oss-20b shapes, synthetic weights, one run.

gptoss: random MXFP4 experts and bf16 rest (gptoss.random_model's recipe, drawn on the device; `--kernels` passed
through); transformers: GptOssForCausalLM from its config, random bf16 (dense experts) on the same device, eager
attention (gpt-oss has no sdpa path: its sinks need eager, flash or flex). Rows: HBM bandwidth (an on-device
reduction); decode tok/s at batch 1/8/64 through each side's `generate` (greedy; two lengths sharing one compiled loop,
their difference cancels prefill; transformers with a static cache, eager) and the roofline fraction (weight bytes a
step reads / step time / bandwidth); time to first token of a 128-token prompt; prefill tok/s at 2,048 and 32,768
tokens (generate's prefill: forward, KV-cache write, last logits) with peak device memory; speed ratios
gptoss/transformers. Each measurement is guarded (an error such as out of memory is recorded, the run goes on), the
JSON is rewritten after each, and none starts after --budget seconds.

    python benchmarks/gpu.py                   # the 20b shapes, both sides (about 6-7 minutes on an H200)
    python benchmarks/gpu.py --skip-transformers --parts decode,ttft --kernels xla
    python benchmarks/gpu.py --reduced         # anywhere, in seconds: tiny shapes (what the test suite runs)

Prints a table and writes benchmarks/results/gpu.json (gpu_reduced.json with --reduced).
"""

from __future__ import annotations

import time

T0 = time.perf_counter()  # the budget counts from here (imports included)

import argparse  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

# JAX must not grab 75% of the GPU up front: transformers shares it (must be set before jax starts its backend)
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import GIB, log, machine_info, print_table, write_json  # noqa: E402

from gptoss import ModelConfig, random_model  # noqa: E402
from gptoss.config import default_layer_types  # noqa: E402
from gptoss.engine import generate  # noqa: E402
from gptoss.kernels.select import KERNELS  # noqa: E402

gen_mod = importlib.import_module("gptoss.engine.generate")  # the module (the package exports the function)

PARTS = ("bandwidth", "decode", "ttft", "prefill")


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:600]


def device_bandwidth(gib: float) -> float:
    """Bytes/s of a large on-device reduction: what a weight-streaming decode step can hope for."""
    x = jnp.ones((int(gib * 2**30) // 4,), jnp.float32)
    f = jax.jit(jnp.sum)
    f(x).block_until_ready()
    best = min(_timed(lambda: f(x).block_until_ready()) for _ in range(5))
    return x.nbytes / best


def step_bytes(cfg: ModelConfig, batch: int, expert_bytes: float) -> int:
    """Weight bytes one decode step reads: bf16 attention/router/unembedding + the experts the batch hits (expected
    distinct per layer; exactly top-k at batch 1) at `expert_bytes` per weight (MXFP4 17/32, bf16 2). KV cache aside."""
    D, I, E, k = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, cfg.experts_per_token
    attn = D * (cfg.q_width + 2 * cfg.kv_width) + cfg.q_width * D + E * D
    hit = E * (1 - (1 - k / E) ** batch)
    return int(cfg.num_hidden_layers * (2 * attn + hit * 3 * I * D * expert_bytes) + 2 * cfg.vocab_size * D)


def prompts_for(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    return np.random.default_rng([seed, batch, length]).integers(0, min(vocab, 199990), (batch, length)).tolist()


# ---------------------------------------------------------------------------------------------- the two sides
def device_random_model(cfg: ModelConfig, kernels: str, seed: int = 0):
    """gptoss.random_model's recipe (its per-parameter distributions, gptoss.model.random._spec) drawn with jax.random
    on the device: seconds on a GPU at the 20b shapes, where random_model's host numpy draws take one to two minutes
    (on a CPU, numpy is the faster of the two)."""
    from gptoss.model.gpt_oss import GptOss
    from gptoss.model.random import _spec
    from gptoss.quant import MXFP4Array

    abstract = nnx.eval_shape(lambda: GptOss(cfg, dtype=jnp.bfloat16, experts="mxfp4", kernels=kernels))
    graphdef, state = nnx.split(abstract)
    key = jax.random.key(seed)
    for i, (path, var) in enumerate(nnx.to_flat_state(state)):
        kind, shape, dtype, a, b = _spec(path, var.get_value(), 0.3)  # random_model's default bias_std
        k = jax.random.fold_in(key, i)
        if kind == "mxfp4":
            var.set_value(MXFP4Array(*_draw_mxfp4(k, shape, a), jnp.dtype(dtype)))
        else:
            var.set_value(_draw_normal(k, shape, jnp.dtype(dtype), a, b))
    return nnx.merge(graphdef, state)


@functools.partial(jax.jit, static_argnums=(1,))
def _draw_mxfp4(key, shape, center):
    """Uniform code bytes; scale bytes in center +- 2 (as random_model)."""
    k1, k2 = jax.random.split(key)
    return (jax.random.bits(k1, shape, jnp.uint8),
            jax.random.randint(k2, shape[:-1], center - 2, center + 3, jnp.int32).astype(jnp.uint8))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _draw_normal(key, shape, dtype, std, mean):
    return (jax.random.normal(key, shape, jnp.float32) * std + mean).astype(dtype)


class Ours:
    name, expert_bytes, compiles = "gptoss", 17 / 32, True

    def __init__(self, cfg: ModelConfig, kernels: str, init: str):
        self.cfg = cfg
        if init == "device":
            self.model = device_random_model(cfg, kernels)
        else:
            self.model = random_model(cfg, dtype=jnp.bfloat16, experts="mxfp4", kernels=kernels)
        jax.block_until_ready(nnx.state(self.model))

    def info(self) -> dict:
        rt = self.model.runtime() if hasattr(self.model, "runtime") else None
        out = {"requested": getattr(self.model, "kernels", None), "moe_impl": getattr(self.model, "moe_impl", None),
               "runtime": repr(rt)}
        for attr in ("kernels", "cpu_kernels", "pallas_kernels"):  # whichever this version has
            try:
                out[f"runtime.{attr}"] = getattr(rt, attr, None)
            except Exception as e:  # a property that refuses this backend
                out[f"runtime.{attr}"] = _err(e)
        probe = getattr(importlib.import_module("gptoss.kernels.select"), "pallas_compiles", None)
        if probe is not None and jax.default_backend() == "gpu":
            try:
                out["pallas_compiles"] = list(probe())  # (ok, first error)
            except Exception as e:
                out["pallas_compiles"] = _err(e)
        return {k: v for k, v in out.items() if v is not None}

    def generate(self, prompts, n: int) -> None:
        generate(self.model, prompts, max_new_tokens=n, stop_tokens=[])  # returns host arrays: blocks

    def prefill(self, length: int, fallback: bool = False):
        """generate's own prefill (forward, cache write, last-token logits), compiled for this length; `fallback`:
        the forward without a cache (+ last logits), for when generate's prefill does not fit."""
        prompt = prompts_for(1, length, self.cfg.vocab_size, seed=1)
        graphdef, state = nnx.split(self.model)
        if fallback:
            tokens = jnp.asarray(prompt, jnp.int32)
            return lambda: _forward_last(graphdef, state, tokens).block_until_ready(), "forward without cache"
        jit = getattr(gen_mod, "_prefill_jit", None)
        if jit is None:
            return lambda: self.generate(prompt, 1), "generate(max_new_tokens=1)"
        tokens, positions, lens, cache_len = gen_mod.prepare(self.model, prompt, 1)
        return (lambda: jax.block_until_ready(jit(graphdef, state, tokens, positions, lens, cache_len)),
                f"generate's prefill (cache {cache_len})")

    def reset_peak(self) -> None:
        pass  # jax keeps one process-wide peak: a row reports the peak so far (see out["notes"])

    def memory(self) -> dict:
        try:
            s = jax.devices()[0].memory_stats() or {}
        except Exception:
            s = {}
        return {"peak_bytes": s.get("peak_bytes_in_use"), "in_use_bytes": s.get("bytes_in_use"),
                "limit_bytes": s.get("bytes_limit")}

    def status(self) -> dict:
        return {}

    def after_error(self) -> None:
        gc.collect()

    def close(self) -> None:
        del self.model
        gc.collect()


@functools.partial(jax.jit, static_argnums=0)
def _forward_last(graphdef, state, tokens):
    model = nnx.merge(graphdef, state)
    B, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    x, _, _ = model.hidden_states(tokens, positions, None, in_order=True)
    return model.logits(x[:, -1:])[:, 0]


class Theirs:
    name, expert_bytes, compiles = "transformers", 2, False

    def __init__(self, cfg: ModelConfig, device: str, cache: str):
        import torch
        import transformers
        from transformers import GptOssConfig, GptOssForCausalLM

        transformers.logging.set_verbosity_error()
        self.torch, self.device, self.cfg = torch, device, cfg
        self.cache = None if cache == "dynamic" else cache
        if device == "cpu":
            torch.set_num_threads(1)  # small shapes only: more threads just contend with XLA's (10x slower)
        hf = cfg.to_hf()
        for key in ("pad_token_id", "eos_token_id"):  # tiny vocabularies: ids outside it are refused
            if not isinstance(hf.get(key), int) or hf[key] >= cfg.vocab_size:
                hf[key] = None
        with torch.device(device):  # random init directly on the device, in bf16
            self.model = GptOssForCausalLM._from_config(GptOssConfig(**hf), dtype=torch.bfloat16,
                                                        attn_implementation="eager").eval()
        self.sync()

    def info(self) -> dict:
        c = self.model.config
        return {"device": self.device, "attn_implementation": getattr(c, "_attn_implementation", None),
                "experts_implementation": getattr(c, "_experts_implementation", None),
                "cache_implementation": self.cache or "dynamic", "dtype": str(self.model.dtype),
                "params": sum(p.numel() for p in self.model.parameters()),
                "device_name": (self.torch.cuda.get_device_name() if self.device == "cuda" else None)}

    def sync(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def generate(self, prompts, n: int) -> None:
        try:
            self._generate(prompts, n)
        except Exception as e:
            if self.cache is None or isinstance(e, getattr(self.torch, "OutOfMemoryError", ())):
                raise
            self.static_error, self.cache = _err(e), None  # a static cache refused: transformers' default
            self.after_error()
            self._generate(prompts, n)

    def _generate(self, prompts, n: int) -> None:
        torch = self.torch
        ids = torch.tensor(prompts, device=self.device)
        with torch.inference_mode():
            self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                do_sample=False, eos_token_id=None, pad_token_id=0, cache_implementation=self.cache,
                                disable_compile=True)  # no torch.compile: it recompiles per batch and cache length
        self.sync()

    def status(self) -> dict:
        out = {"cache_implementation": self.cache or "dynamic"}
        if getattr(self, "static_error", None):
            out["static_cache_error"] = self.static_error
        return out

    def prefill(self, length: int, fallback: bool = False):
        torch = self.torch
        ids = torch.tensor(prompts_for(1, length, self.cfg.vocab_size, seed=1), device=self.device)

        def run():
            with torch.inference_mode():
                self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
            self.sync()

        return run, "forward(use_cache=True, logits_to_keep=1)"

    def reset_peak(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.reset_peak_memory_stats()

    def memory(self) -> dict:
        if self.device != "cuda":
            return {}
        cuda = self.torch.cuda
        return {"peak_bytes": cuda.max_memory_allocated(), "in_use_bytes": cuda.memory_allocated(),
                "reserved_bytes": cuda.memory_reserved()}

    def after_error(self) -> None:
        gc.collect()
        if self.device == "cuda":
            self.torch.cuda.empty_cache()

    def close(self) -> None:
        del self.model
        self.after_error()


# ---------------------------------------------------------------------------------------------- the rows
def decode_row(side, cfg, batch: int, prompt_len: int, new: int, runs: int, bandwidth: float | None) -> dict:
    """generate with `new` and new//2+1 tokens (same compiled shapes: buffer and cache buckets agree); the time
    difference over the extra steps is the decode step, prefill cancelling out."""
    short = new // 2 + 1
    prompts = prompts_for(batch, prompt_len, cfg.vocab_size)
    first = _timed(lambda: side.generate(prompts, new if side.compiles else 2))  # compile / warm-up
    short_s = long_s = float("inf")
    for attempt in range(runs + 20):  # up to 20 more pairs while noise hides the difference (tiny shapes, a busy
        # machine: the reduced mode's decode step is ~0.15 ms, 7 of them against the test suite's other worker)
        short_s = min(short_s, _timed(lambda: side.generate(prompts, short)))
        long_s = min(long_s, _timed(lambda: side.generate(prompts, new)))
        if attempt + 1 >= runs and long_s > short_s:
            break
    if long_s <= short_s:
        raise RuntimeError(f"timing noise: {new} tokens took {long_s:.4f}s, {short} tokens {short_s:.4f}s")
    step = (long_s - short_s) / (new - short)
    nbytes = step_bytes(cfg, batch, side.expert_bytes)
    row = {"batch": batch, "prompt": prompt_len, "new": [short, new], "first_call_s": first, "short_s": short_s,
           "long_s": long_s, "step_s": step, "tok_s": batch / step, "tok_s_per_row": 1 / step, "step_bytes": nbytes}
    if bandwidth:
        row["roofline"] = nbytes / step / bandwidth
    return row


def ttft_row(side, cfg, prompt_len: int, runs: int) -> dict:
    prompt = prompts_for(1, prompt_len, cfg.vocab_size, seed=2)
    first = _timed(lambda: side.generate(prompt, 1))  # compile / warm-up
    return {"prompt": prompt_len, "first_call_s": first,
            "s": min(_timed(lambda: side.generate(prompt, 1)) for _ in range(max(runs, 3)))}


def prefill_row(side, length: int, runs: int, fallback: bool = False) -> dict:
    fn, method = side.prefill(length, fallback)
    first = _timed(fn)  # compile / warm-up
    s = min(_timed(fn) for _ in range(runs))
    return {"tokens": length, "method": method, "first_call_s": first, "s": s, "tok_s": length / s}


class Recorder:
    """Runs each measurement guarded: an error is recorded, the JSON rewritten, nothing starts after the budget."""

    def __init__(self, out: dict, name: str, budget: float):
        self.out, self.name, self.budget = out, name, budget

    def elapsed(self) -> float:
        return time.perf_counter() - T0

    def __call__(self, side, section: str, key: str, fn) -> dict:
        where = self.out[side.name].setdefault(section, {})
        if self.elapsed() > self.budget:
            row = {"skipped": f"time budget of {self.budget:.0f}s spent"}
        else:
            side.reset_peak()
            t0 = time.perf_counter()
            error = None
            try:
                row = fn()
            except Exception as e:
                error = _err(e)
            if error:  # outside the except clause: the traceback (and what its frames hold) is gone
                row = {"error": error}
                side.after_error()
            row["wall_s"] = time.perf_counter() - t0
            row.update({k: v for k, v in side.memory().items() if v is not None})
            self.out[side.name].update(side.status())
        where[key] = row
        log(f"{side.name} {section} {key}: " + (row.get("error") or row.get("skipped") or f"{row['wall_s']:.1f}s"))
        self.save()
        return row

    def save(self) -> Path:
        self.out["elapsed_s"] = self.elapsed()
        ratios(self.out)
        return write_json(self.name, self.out)


# ---------------------------------------------------------------------------------------------- main
def reduced_config() -> ModelConfig:
    return ModelConfig.gpt_oss_20b().replace(num_hidden_layers=2, layer_types=default_layer_types(2),
                                             hidden_size=256, intermediate_size=256, num_experts=8,
                                             num_attention_heads=8, num_key_value_heads=2, vocab_size=1024)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reduced", action="store_true", help="tiny shapes, any backend, seconds (the suite's smoke run)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma list of: {', '.join(PARTS)}")
    ap.add_argument("--skip-transformers", action="store_true", help="gptoss only")
    ap.add_argument("--init", choices=("auto", "device", "host"), default="auto",
                    help="gptoss weights: random_model's recipe drawn on the device, or random_model itself (host); "
                         "auto: device unless JAX runs on the CPU")
    ap.add_argument("--kernels", choices=KERNELS, default="auto", help="gptoss kernels (gptoss.kernels.select)")
    ap.add_argument("--batches", type=int, nargs="+", help="decode batches (default 1 8 64; reduced 1 2 4)")
    ap.add_argument("--prompt", type=int, help="decode prompt and TTFT prompt length (default 128; reduced 16)")
    ap.add_argument("--new", type=int, help="longer generate length, a power of 2; the shorter is new/2+1 "
                                            "(default 64; reduced 16)")
    ap.add_argument("--prefill", type=int, nargs="+", help="prefill lengths (default 2048 32768; reduced 64 128)")
    ap.add_argument("--runs", type=int, default=2, help="timed repetitions per measurement (best kept)")
    ap.add_argument("--layers", type=int, help="override the layer count (sanity runs of the full-width code path)")
    ap.add_argument("--hf-cache", default="static", choices=("static", "dynamic"),
                    help="transformers generate's KV cache (static: preallocated, as gptoss's generate; eager either "
                         "way: generate's automatic torch.compile of static-cache decoding is turned off)")
    ap.add_argument("--name", help="results file benchmarks/results/NAME.json (default gpu, gpu_reduced)")
    ap.add_argument("--budget", type=float, default=420, help="seconds since start after which no measurement starts")
    args = ap.parse_args()
    full = dict(batches=[1, 8, 64], prompt=128, new=64, prefill=[2048, 32768])
    small = dict(batches=[1, 2, 4], prompt=16, new=16, prefill=[64, 128])
    for k, v in (small if args.reduced else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.init == "auto":
        args.init = "host" if jax.default_backend() == "cpu" else "device"
    if args.new < 4:
        ap.error("--new must be at least 4 (two generate lengths, new/2+1 and new)")
    args.parts = [p for p in args.parts.split(",") if p]
    if bad := set(args.parts) - set(PARTS):
        ap.error(f"unknown parts {sorted(bad)}; choose from {PARTS}")
    return args


def transformers_device(args) -> tuple[str | None, str]:
    """(device, why): cuda when torch has it; the CPU only for small runs (the 20b shapes need 42 GB in bf16)."""
    if args.skip_transformers:
        return None, "--skip-transformers"
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError as e:
        return None, f"not importable: {_err(e)}"
    if torch.cuda.is_available():
        return "cuda", "torch.cuda.is_available()"
    if args.reduced or args.layers is not None:
        return "cpu", "no CUDA; small shapes on the CPU"
    return None, "torch has no CUDA (the 20b shapes on the CPU would need 42 GB)"


def main() -> None:
    args = parse_args()
    cfg = reduced_config() if args.reduced else ModelConfig.gpt_oss_20b()
    if args.layers is not None:
        cfg = cfg.replace(num_hidden_layers=args.layers, layer_types=default_layer_types(args.layers))
    name = args.name or ("gpu_reduced" if args.reduced else "gpu")
    dev = jax.devices()[0]
    out = {"benchmark": "gpu", "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
           "device_kind": getattr(dev, "device_kind", None), "machine": machine_info(), "reduced": args.reduced,
           "args": {k: v for k, v in vars(args).items()}, "config": cfg.to_hf(),
           "env": {k: os.environ.get(k) for k in ("XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_MEM_FRACTION",
                                                  "GPTOSS_KERNELS", "XLA_FLAGS")},
           "notes": {"ratios": "gptoss speed / transformers speed (>1: gptoss faster); TTFT: transformers s / gptoss s",
                     "peak_bytes": "gptoss: jax's process-wide peak so far (jax has no reset); "
                                   "transformers: torch.cuda.max_memory_allocated since the row began",
                     "decode": "step_s = (long_s - short_s) / (new[1] - new[0]); tok_s = batch / step_s; "
                               "roofline = step_bytes / step_s / bandwidth_Bps, step_bytes = weights only (the "
                               "expected distinct experts hit at batch > 1), KV cache aside"},
           "gptoss": {}, "transformers": {}, "ratios": {}}
    rec = Recorder(out, name, args.budget)
    if "bandwidth" in args.parts or "decode" in args.parts:
        try:
            out["bandwidth_Bps"] = device_bandwidth(0.25 if args.reduced else 4.0)
        except Exception as e:
            out["bandwidth_error"] = _err(e)
    bandwidth = out.get("bandwidth_Bps")

    sides = []
    t0 = time.perf_counter()
    out["gptoss"]["init"] = args.init
    try:
        try:
            sides.append(Ours(cfg, args.kernels, args.init))
        except Exception as e:  # e.g. random_model's internals moved: its own (slower) path
            if args.init != "device":
                raise
            out["gptoss"].update(init="host", device_init_error=_err(e))
            sides.append(Ours(cfg, args.kernels, "host"))
        out["gptoss"]["init_s"] = time.perf_counter() - t0
        out["gptoss"]["kernels"] = sides[0].info()
        out["gptoss"]["weights"] = sides[0].memory()
    except Exception as e:
        out["gptoss"]["error"] = _err(e)
    device, why = transformers_device(args)
    out["transformers"]["status"] = why
    if device:
        t0 = time.perf_counter()
        try:
            sides.append(Theirs(cfg, device, args.hf_cache))
            out["transformers"]["init_s"] = time.perf_counter() - t0
            out["transformers"].update(sides[-1].info(), weights=sides[-1].memory())
        except Exception as e:
            out["transformers"]["error"] = _err(e)
            gc.collect()
    rec.save()

    # Rows in order of value and of memory: batch-1 decode and TTFT first, the largest prefill last (transformers
    # first there, then freed, so that gptoss's largest prefill has the device to itself).
    plan = []
    if "decode" in args.parts:
        plan += [("decode", b) for b in args.batches[:1]]
    if "ttft" in args.parts:
        plan.append(("ttft", args.prompt))
    if "decode" in args.parts:
        plan += [("decode", b) for b in args.batches[1:]]
    if "prefill" in args.parts:
        plan += [("prefill", n) for n in sorted(args.prefill)]
    for i, (section, key) in enumerate(plan):
        last = i == len(plan) - 1
        for side in sorted(sides, key=lambda s: s.name == "gptoss") if last else sides:
            if section == "decode":
                fn = functools.partial(decode_row, side, cfg, key, args.prompt, args.new, args.runs, bandwidth)
            elif section == "ttft":
                fn = functools.partial(ttft_row, side, cfg, key, args.runs)
            else:
                fn = functools.partial(prefill_row, side, key, args.runs)
            row = rec(side, section, str(key), fn)
            if section == "prefill" and side.name == "gptoss" and "error" in row:  # generate's prefill did not fit
                fallback = functools.partial(prefill_row, side, key, args.runs, fallback=True)
                rec(side, section, str(key), lambda f=fallback, e=row["error"]: f() | {"generate_prefill_error": e})
            if last and side.name == "transformers":
                side.close()
                sides.remove(side)
    for side in sides:
        side.close()

    report(out, cfg, args)
    path = rec.save()
    print(json.dumps({"written": str(path)}))


def ratios(out: dict) -> None:
    ours, theirs = out["gptoss"], out["transformers"]
    for section, field in (("decode", "tok_s"), ("ttft", "s"), ("prefill", "tok_s")):
        for key, a in ours.get(section, {}).items():
            b = theirs.get(section, {}).get(key, {})
            if field in a and field in b:
                r = a[field] / b[field]
                out["ratios"][f"{section}_{key}"] = 1 / r if section == "ttft" else r


def report(out: dict, cfg: ModelConfig, args) -> None:
    def cell(row, field, scale=1.0):
        if not row:
            return None, ""
        if field in row:
            return row[field] * scale, ""
        return ("error" if "error" in row else "skipped"), (row.get("error") or row.get("skipped", ""))[:70]

    def gib(row):
        return None if not row or row.get("peak_bytes") is None else row["peak_bytes"] / GIB

    rows = []
    if "bandwidth_Bps" in out:
        rows.append(["HBM bandwidth GB/s", out["bandwidth_Bps"] / 1e9, None, None, None, None, ""])
    labels = {"decode": ("decode b{} tok/s", "tok_s", 1.0), "ttft": ("TTFT {} tokens, ms", "s", 1e3),
              "prefill": ("prefill {} tok/s", "tok_s", 1.0)}
    for section in ("decode", "ttft", "prefill"):
        for key, a in out["gptoss"].get(section, {}).items():
            b = out["transformers"].get(section, {}).get(key)
            label, field, scale = labels[section]
            (va, na), (vb, nb) = cell(a, field, scale), cell(b, field, scale)
            note = "; ".join(n for n in (na and f"gptoss: {na}", nb and f"transformers: {nb}") if n)
            if section == "prefill" and "generate_prefill_error" in a:
                note = "; ".join([f"gptoss: {a['method']} (generate's prefill failed)"] + ([note] if note else []))
            if section == "decode" and "roofline" in a:
                extra = [f"roofline {100 * a['roofline']:.0f}%"]
                if b and "roofline" in b:
                    extra[0] += f" (hf {100 * b['roofline']:.0f}%)"
                if int(key) > 1:
                    extra.append(f"per row {a['tok_s_per_row']:.3g}")
                note = "; ".join(extra + ([note] if note else []))
            rows.append([label.format(key), va, vb, out["ratios"].get(f"{section}_{key}"), gib(a), gib(b), note])
    kern = out["gptoss"].get("kernels", {})
    print_table(f"gpt-oss-20b shapes{' (REDUCED)' if args.reduced else ''}, {cfg.num_hidden_layers} layers, on "
                f"{out['device_kind'] or out['backend']}: gptoss (kernels={kern.get('requested')}, MXFP4 experts) vs "
                f"transformers ({out['transformers'].get('device') or out['transformers'].get('status')}, bf16)",
                ["row", "gptoss", "transformers", "ratio", "gptoss peak GiB", "hf peak GiB", "note"], rows)


if __name__ == "__main__":
    main()
