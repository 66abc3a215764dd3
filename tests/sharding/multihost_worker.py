"""One process of a multi-process (multi-host) run on localhost; launched by tests/sharding/test_multihost.py.

    JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=i \\
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python multihost_worker.py CKPT IN.npz OUT_PREFIX MESH

Starts JAX's distributed runtime from the environment (gptoss.sharding.init_distributed), loads the
checkpoint onto the global mesh (each process places only its own devices' slices), runs the model and
greedy generation (generate and generate_stream), and writes what it saw to OUT_PREFIX.<process>.json and
the logits it read to OUT_PREFIX.logits.<process>.npy.
"""

from __future__ import annotations

import json
import sys
import time

from gptoss.sharding import init_distributed


def main(ckpt: str, inputs: str, out_prefix: str, mesh_text: str) -> None:
    t0 = time.perf_counter()
    multi = init_distributed()  # before anything touches a device

    import jax
    import numpy as np

    import gptoss
    from gptoss.sharding.planner import parse_mesh

    data = np.load(inputs)
    tokens = data["tokens"]
    prompts = [p[p >= 0].tolist() for p in data["prompts"]]
    model = gptoss.from_pretrained(ckpt, dtype="float32", mesh=parse_mesh(mesh_text), progress=False)
    logits = np.asarray(model(tokens))  # replicated for every process
    gen = gptoss.generate(model, prompts, max_new_tokens=int(data["new"]))
    streamed = [[] for _ in prompts]
    for step in gptoss.generate_stream(model, prompts, max_new_tokens=int(data["new"])):
        for row, tok in zip(streamed, step):
            if tok is not None:
                row.append(tok)
    owned = {}
    for block in model.layers:
        for w in (block.mlp.gate_up_EFD[...], block.mlp.down_EDI[...]):
            for arr in (w.blocks, w.scales):
                owned["addressable"] = owned.get("addressable", 0) + sum(s.data.nbytes for s in arr.addressable_shards)
                owned["global"] = owned.get("global", 0) + arr.nbytes
    report = {"multi": multi, "process": jax.process_index(), "processes": jax.process_count(),
              "local_devices": jax.local_device_count(), "global_devices": jax.device_count(),
              "mesh": dict(model.layout.mesh.shape), "tokens": gen.tokens, "streamed": streamed,
              "expert_bytes": owned,
              "seconds": time.perf_counter() - t0}
    with open(f"{out_prefix}.{jax.process_index()}.json", "w") as f:
        json.dump(report, f)
    np.save(f"{out_prefix}.logits.{jax.process_index()}.npy", logits)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:5])
