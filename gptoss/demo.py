"""`make demo`: write a tiny random checkpoint, load it back and show next-token predictions.

Until a trained demo model exists, this exercises the whole path a real checkpoint takes: save in HF
layout with MXFP4 experts, load tensor by tensor, run the jitted forward.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptoss.config import ModelConfig
from gptoss.io import from_pretrained, save_pretrained
from gptoss.model import GptOss


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokens", type=int, default=12, help="prompt length")
    args = parser.parse_args(argv)

    cfg = ModelConfig.tiny(vocab_size=512, hidden_size=128, intermediate_size=96, num_hidden_layers=4)
    model = GptOss(cfg, dtype=jnp.float32, experts="mxfp4", rngs=nnx.Rngs(args.seed))
    with tempfile.TemporaryDirectory() as folder:
        save_pretrained(model, folder)
        files = sorted(os.listdir(folder))
        size = sum(os.path.getsize(os.path.join(folder, f)) for f in files)
        print(f"wrote a random tiny gpt-oss ({cfg.num_params():,} params, {size / 1e6:.2f} MB) -> {files}")
        t0 = time.perf_counter()
        loaded = from_pretrained(folder, dtype="float32", progress=False)
        print(f"loaded in {time.perf_counter() - t0:.2f} s; experts stay packed: "
              f"{loaded.layers[0].mlp.gate_up_EFD.get_value()}")

    prompt = np.random.default_rng(args.seed).integers(0, cfg.vocab_size, (1, args.tokens))
    t0 = time.perf_counter()
    logits, router = loaded(prompt, return_router_logits=True)
    logits = np.asarray(logits)
    print(f"forward (incl. compile) {time.perf_counter() - t0:.2f} s; logits {logits.shape} float32")
    same = np.allclose(logits, np.asarray(model(prompt)), atol=1e-5)
    print(f"reloaded model reproduces the original's logits: {same}")
    print(f"\n{'pos':>3} {'token':>6} {'next (top-3)':>22} {'layer-0 experts':>16}")
    top3 = np.argsort(-logits[0], axis=-1)[:, :3]
    experts = np.argsort(-np.asarray(router)[0, 0], axis=-1)[:, : cfg.experts_per_token]
    for t in range(args.tokens):
        print(f"{t:>3} {prompt[0, t]:>6} {str(top3[t].tolist()):>22} {str(sorted(experts[t].tolist())):>16}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
