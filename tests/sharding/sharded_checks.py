"""Sharded vs single-device checks on 8 virtual CPU devices; run as a script (it sets XLA_FLAGS before JAX starts).

    python tests/sharding/sharded_checks.py OUT.json [inference|training]

Writes one JSON report; tests/sharding/test_sharded.py runs the inference part once (one subprocess for every
mesh) and asserts on it, tests/sharding/test_sharded_training.py the training part (gradients, expert-parallel
FLOPs): two subprocesses, which a parallel test run can place on different cores. The model is a tiny gpt-oss
whose dims the meshes divide but are otherwise all distinct (vocab 344, hidden 96, intermediate 64, 16 heads, 4 kv
heads of 12, 8 experts, top-3), with random biases, sinks and norm gains, saved as an HF MXFP4 checkpoint and
loaded with `from_pretrained(path, mesh=...)`.
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402
from flax import nnx  # noqa: E402

import gptoss  # noqa: E402
from gptoss.engine import generate  # noqa: E402
from gptoss.engine.generate import _prefill_jit, bucket, init_cache, prepare  # noqa: E402
from gptoss.sharding import MEGATRON_RULES, Layout, device_bytes, plan  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from parity_models import grad_errors, hf_nll_grads, load_hf, our_nll_grads  # noqa: E402
from sharding_tiny import CFG, random_model  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MESHES = {  # name -> mesh dict (data x expert x tensor)
    "8x1x1": {"data": 8}, "1x8x1": {"expert": 8}, "2x4x1": {"data": 2, "expert": 4},
    "2x2x2": {"data": 2, "expert": 2, "tensor": 2}, "1x1x8": {"tensor": 8},
}
PROMPT_LENS = (9, 5, 12, 7, 3, 10, 6, 11)  # 8 rows: the cache batch splits 8 ways
NEW = 6
T = 12


def expert_bytes_per_device(model) -> dict:
    out: dict = {}
    for block in model.layers:
        for w in (block.mlp.gate_up_EFD[...], block.mlp.down_EDI[...]):
            for arr in (w.blocks, w.scales):
                for shard in arr.addressable_shards:
                    out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out


def cache_bytes_device0(cache) -> int:
    dev = jax.devices()[0]
    return sum(s.data.nbytes for c in cache for a in (c.k_BSKH, c.v_BSKH, c.pos_BS)
               for s in a.addressable_shards if s.device == dev)


def check_mesh(path, mesh, ref, tokens, prompts, kernel=True, impls=("auto",), gen=True, engine_cache=False):
    """Loads the checkpoint onto `mesh` (a dict, a jax Mesh or a Layout) and compares with the reference."""
    t0 = time.perf_counter()
    model = gptoss.from_pretrained(path, dtype="float32", mesh=mesh, progress=False,
                                   kernels="auto" if kernel else "xla")
    layout = model.layout
    sizes = dict(layout.mesh.shape)
    out = {"mesh": sizes, "notes": list(layout.notes)}
    toks, pos, lens, cache_len = prepare(model, prompts, NEW)
    out["logits_max_abs_err"] = {
        impl: float(np.abs(np.asarray(model(tokens, moe_impl=impl)) - ref["logits"]).max()) for impl in impls}
    if gen:
        out["tokens"] = generate(model, prompts, max_new_tokens=NEW).tokens
        out["tokens_equal"] = out["tokens"] == ref["tokens"]
    if engine_cache:  # the cache the engine's prefill returns (one more compile)
        graphdef, state = nnx.split(model)
        cache = _prefill_jit(graphdef, state, toks, pos, lens, cache_len)[1]
    else:  # what the engine builds its cache with
        cache = jax.jit(lambda: init_cache(CFG, len(prompts), cache_len, jnp.float32, layout))()
    out["cache_spec_full"] = str(cache[1].k_BSKH.sharding.spec)
    out["cache_spec_ring"] = str(cache[0].k_BSKH.sharding.spec)
    total = sum(w.nbytes for b in model.layers for w in (b.mlp.gate_up_EFD[...], b.mlp.down_EDI[...]))
    per = expert_bytes_per_device(model)
    share = sizes.get("expert", 1) * sizes.get("tensor", 1) * sizes.get("fsdp", 1)  # fsdp stores a split too
    out["expert_bytes"] = {"total": total, "expected_per_device": total // share,
                           "per_device": sorted(per.values()), "devices": len(per)}
    for name, w in (("gate_up", model.layers[0].mlp.gate_up_EFD[...].blocks),
                    ("down", model.layers[0].mlp.down_EDI[...].blocks),
                    ("wq", model.layers[0].attn.wq_NHD[...]), ("wk", model.layers[0].attn.wk_KHD[...])):
        out[f"{name}_spec"] = str(w.sharding.spec)
    p = plan(CFG, sizes, context=cache_len, batch=len(prompts), dtype="float32", rules=layout.rules)
    out["planner"] = {"weights_planned": p.weight_bytes, "weights_real": sorted(set(device_bytes(model).values())),
                      "cache_planned": p.kv_cache_bytes, "cache_real_device0": cache_bytes_device0(cache),
                      "experts_planned": p.expert_bytes}
    out["seconds"] = time.perf_counter() - t0
    return out


GRAD_MESHES = {"2x2x2": {"data": 2, "expert": 2, "tensor": 2}, "1x8x1": {"expert": 8}}
# strategies checked per expert format and mesh (each case is one 8-device gradient compile: ~10 s on 2 cores);
# every strategy on 8 devices once, both meshes, both expert formats
GRAD_CASES = {"mxfp4": {"2x2x2": ("grouped",), "1x8x1": ("gather",)},
              "dense": {"2x2x2": ("dense",)}}


def gradient_checks(folder: str, tokens) -> dict:
    """jax.grad of the mean token NLL on 8 devices vs one device vs torch autograd through transformers, for every
    strategy, with packed experts (frozen) and with dense ones (trained): worst per-parameter relative errors."""
    out = {}
    dense_folder = os.path.join(folder, "dense")  # inside the temporary folder: removed with it
    t0 = time.perf_counter()
    single = gptoss.from_pretrained(folder, dtype="float32", progress=False)
    gptoss.save_pretrained(single, dense_folder, experts="dense")
    for experts, path, mxfp4 in (("mxfp4", folder, True), ("dense", dense_folder, False)):
        _, torch_grads = hf_nll_grads(load_hf(path, mxfp4=mxfp4), tokens)
        model = gptoss.from_pretrained(path, dtype="float32", progress=False)
        impls = sorted({i for case in GRAD_CASES[experts].values() for i in case})
        ref = {impl: our_nll_grads(model, tokens, impl)[1] for impl in impls}
        rows = {}
        for name, strategies in GRAD_CASES[experts].items():
            sharded = gptoss.from_pretrained(path, dtype="float32", mesh=GRAD_MESHES[name], progress=False)
            for impl in strategies:
                ours = our_nll_grads(sharded, tokens, impl)[1]
                vs_single, vs_torch = grad_errors(ours, ref[impl]), grad_errors(ours, torch_grads, CFG.pad_token_id)
                rows[f"{name}/{impl}"] = {
                    "params": len(ours), "vs_single": max(vs_single.values()), "vs_torch": max(vs_torch.values()),
                    "worst_vs_single": max(vs_single, key=vs_single.get),
                    "expert_grads": any(n.endswith("experts.down_proj") for n in ours)}
        rows["single/vs_torch"] = max(max(grad_errors(ref[i], torch_grads, CFG.pad_token_id).values())
                                      for i in impls)
        print(f"gradients, {experts}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        out[experts] = rows
    return out


def train_step_checks(folder: str) -> dict:
    """Five optimizer steps (LoRA on the MXFP4 base) on the mesh data 2 x fsdp 2 x expert 2 vs one device: per-step
    losses. (Full training was checked the same way, 3e-6; it is left out for the suite's time.)"""
    from gptoss.train import LoraConfig, OptimConfig, Trainer, add_lora

    rng = np.random.default_rng(11)
    batches = []
    for _ in range(5):
        t = rng.integers(0, CFG.vocab_size, (8, 13)).astype(np.int32)
        w = np.ones((8, 12), np.float32)
        w[:, :2] = 0
        batches.append({"inputs": t[:, :-1], "targets": t[:, 1:], "weights": w})
    out = {}
    for method, path in (("lora", folder),):  # full training on a mesh: the gradient checks above cover it
        losses = {}
        for name, mesh in (("single", None), ("2x2x2", {"data": 2, "fsdp": 2, "expert": 2})):
            model = gptoss.from_pretrained(path, dtype="float32", progress=False, mesh=mesh)
            if method == "lora":
                add_lora(model, LoraConfig(rank=2, alpha=4), seed=3)
            trainer = Trainer(model, method, OptimConfig(learning_rate=1e-2, total_steps=5))
            state, losses[name] = trainer.init(), []
            for b in batches:
                state, m = trainer.step(state, b)
                losses[name].append(float(m["loss"]))
            if mesh is not None:  # how parameters, adapters and optimizer state are stored (fsdp: split over it)
                out[f"{method}_compiles"] = trainer._step._cache_size()  # jit's own count of compiled variants
                tree = {"model": nnx.state(trainer.model(state)), "opt": state.opt_state}
                out[f"{method}_specs"] = {
                    jax.tree_util.keystr(path): str(leaf.sharding.spec)
                    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
                    if any(n in jax.tree_util.keystr(path) for n in ("unembed_VD", "gate_up_EFD", "wq_NHD", "q_a_DR"))}
        out[method] = {**losses, "max_rel": max(abs(a - b) / abs(b) for a, b in zip(losses["2x2x2"],
                                                                                   losses["single"]))}
    # adapter dropout inside the sharded MoE (each shard draws its own masks, so no equality with one device)
    model = gptoss.from_pretrained(folder, dtype="float32", progress=False, mesh={"data": 2, "fsdp": 2, "expert": 2})
    add_lora(model, LoraConfig(rank=2, alpha=4, dropout=0.3), seed=3)
    trainer = Trainer(model, "lora", OptimConfig(learning_rate=1e-2, total_steps=3))
    state, out["lora_dropout"] = trainer.init(), []
    for _ in range(3):  # one batch again and again: its loss must fall
        state, m = trainer.step(state, batches[0])
        out["lora_dropout"].append(float(m["loss"]))
    return out


def moe_flops(model, impl: str, tokens: int) -> float:
    """Per-device FLOPs of one MoE layer's compiled program (XLA's cost analysis), for `tokens` tokens."""
    x = jnp.asarray(np.random.default_rng(9).normal(size=(1, tokens, CFG.hidden_size)), jnp.float32)
    graphdef, state = nnx.split(model.layers[0].mlp)
    rt = model.runtime(impl)
    compiled = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, rt)[0]).lower(state, x).compile()
    cost = compiled.cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"])


def expert_parallel_flops(folder: str) -> dict:
    """MoE FLOPs per device with expert=8 vs one device, for the strategies whose work XLA's cost analysis sees
    (the grouped loop's trip counts are data-dependent, so it counts one tile of one expert there)."""
    single = gptoss.from_pretrained(folder, dtype="float32", progress=False, kernels="xla")
    ep = gptoss.from_pretrained(folder, dtype="float32", mesh={"expert": 8}, progress=False, kernels="xla")
    out = {}
    for impl in ("gather", "dense"):
        one, eight = moe_flops(single, impl, 64), moe_flops(ep, impl, 64)
        out[impl] = {"single": one, "per_device": eight, "ratio": eight / one}
    return out


def config_run(tmp: str) -> dict:
    """configs/inference/tiny-8dev.yaml end to end (gptoss run), and the same config on one device."""
    from gptoss.apps.runner import run_config

    path = os.path.join(REPO, "configs", "inference", "tiny-8dev.yaml")
    quick = [f"output_dir={tmp}/run8", "sampling.max_new_tokens=8"]
    _, sharded = run_config(path, quick)
    _, single = run_config(path, [f"output_dir={tmp}/run1", "sampling.max_new_tokens=8", "model.mesh=null"])
    with open(f"{tmp}/run8/config.yaml") as f:
        mesh = yaml.safe_load(f)["model"]["mesh"]
    return {"mesh": mesh, "tokens": [r["token_ids"] for r in sharded["results"]],
            "tokens_single_device": [r["token_ids"] for r in single["results"]]}


def main(report_path: str, part: str = "inference") -> None:
    t_start = time.perf_counter()
    report: dict = {"devices": jax.device_count(), "meshes": {}, "part": part}
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, CFG.vocab_size, (3, T)).astype(np.int32)  # 36 tokens: 8 does not divide
    prompts = [rng.integers(0, CFG.vocab_size, n).tolist() for n in PROMPT_LENS]
    with tempfile.TemporaryDirectory(prefix="gptoss-sharded-") as folder:
        gptoss.save_pretrained(random_model(CFG), folder)
        if part == "training":
            report["grads"] = gradient_checks(folder, rng.integers(0, CFG.vocab_size, (4, 10)).astype(np.int32))
            report["ep_flops"] = expert_parallel_flops(folder)
            report["train_steps"] = train_step_checks(folder)
            report["seconds"] = time.perf_counter() - t_start
            with open(report_path, "w") as f:
                json.dump(report, f, indent=1, default=str)
            return
        ref = gptoss.from_pretrained(folder, dtype="float32", progress=False)
        ref_logits = np.asarray(ref(tokens))
        ref_tokens = generate(ref, prompts, max_new_tokens=NEW).tokens
        report["ref"] = {"logits_scale": float(np.abs(ref_logits).max()), "tokens": ref_tokens,
                         "batch": len(prompts), "bucket": bucket(max(PROMPT_LENS))}
        ref = {"logits": ref_logits, "tokens": ref_tokens}
        meshes = dict(MESHES)
        meshes["2x4x1"] = jax.make_mesh((2, 4, 1), ("data", "expert", "tensor"))  # a jax Mesh (Explicit axes)
        for name, mesh in meshes.items():
            report["meshes"][name] = check_mesh(folder, mesh, ref, tokens, prompts, engine_cache=name == "2x2x2")
        # the tensor-parallel expert FFN on the pure-XLA path (no MXFP4 CPU kernel), both local strategies
        report["meshes"]["2x2x2-xla"] = check_mesh(folder, MESHES["2x2x2"], ref, tokens, prompts, kernel=False,
                                                   impls=("gather", "grouped", "dense"), gen=False)
        # down projection split on its reduction blocks (one psum), where the blocks divide: I/32 = 2
        report["meshes"]["megatron-1x1x2"] = check_mesh(folder, Layout.create({"tensor": 2}, CFG, MEGATRON_RULES),
                                                        ref, tokens, prompts, impls=("gather", "grouped", "dense"),
                                                        gen=False)
        # fsdp (reserved for training) acts as extra data parallelism in inference
        report["meshes"]["fsdp2-expert4"] = check_mesh(folder, {"fsdp": 2, "expert": 4}, ref, tokens, prompts,
                                                       gen=False)
        t = time.perf_counter()
        report["config_run"] = config_run(folder)
        report["config_run"]["seconds"] = time.perf_counter() - t
        errors = {}
        bad_cases = {  # a real 8-device Mesh whose axes do not divide the model, and rules whose blocks do not
            "experts": lambda: Layout.create(jax.make_mesh((1, 8, 1), ("data", "expert", "tensor")),
                                             CFG.replace(num_experts=12)),
            "heads": lambda: Layout.create({"tensor": 8}, CFG.replace(num_attention_heads=12, num_key_value_heads=4)),
            "megatron": lambda: Layout.create({"tensor": 8}, CFG, MEGATRON_RULES),
        }
        for name, make in bad_cases.items():
            try:
                make()
                errors[name] = None
            except ValueError as e:
                errors[name] = f"{type(e).__name__}: {e}"
        report["errors"] = errors
    report["seconds"] = time.perf_counter() - t_start
    with open(report_path, "w") as f:
        json.dump(report, f, indent=1, default=str)


if __name__ == "__main__":
    main(*sys.argv[1:3])
