"""The training job (`task: train`): LoRA or full training from a YAML config, with checkpoints that resume
exactly, metrics.jsonl, a loss curve and an export at the end."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import random
import time

import jax
import numpy as np
from tqdm.auto import tqdm

from gptoss.apps.loading import CHAT_FILE, ModelSpec, load_model_and_tokenizer
from gptoss.io import save_pretrained
from gptoss.tokenizer import save_tokenizer_info
from gptoss.train import LoraConfig, LossConfig, OptimConfig, Trainer, add_lora, export_pretrained, save_adapters
from gptoss.train.arithmetic import CHAINS, SUBTRACTION, conversation, problem
from gptoss.train.checkpoint import Checkpoints
from gptoss.train.data import Batches, sft_example, sft_examples, text_file_examples


@dataclasses.dataclass
class DataSpec:
    format: str = "sft"  # "sft": harmony conversations (JSONL); "text": plain text or JSONL {"text": ...};
    # "arithmetic": `count` generated addition/subtraction conversations (gptoss.train.arithmetic)
    path: str = ""
    count: int = 10000
    max_digits: int = 5
    subtraction: float = SUBTRACTION  # arithmetic: share of subtractions
    chains: float = CHAINS            # arithmetic: share of long carry/borrow chains
    loss_on: list[str] = dataclasses.field(default_factory=lambda: ["final"])  # sft: trained assistant channels
    seq_len: int = 256
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self):
        if self.format not in ("sft", "text", "arithmetic"):
            raise ValueError(f"data.format must be 'sft', 'text' or 'arithmetic', got {self.format!r}")
        if self.seq_len < 2 or self.batch_size < 1:
            raise ValueError("data.seq_len must be >= 2 and data.batch_size >= 1")


@dataclasses.dataclass
class ExportSpec:
    adapters: bool = True          # lora: save the adapters on their own (output_dir/adapters)
    model: bool = False            # write the merged model in HF layout (output_dir/model)
    experts: str = "mxfp4"         # "mxfp4" (re-quantized) or "dense"


@dataclasses.dataclass
class TrainJobConfig:
    model: ModelSpec
    data: DataSpec
    task: str = "train"
    name: str = "train"
    method: str = "lora"           # "lora" (adapters on a frozen base) or "full" (every float parameter)
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    steps: int = 100
    save_every: int = 50           # checkpoint interval (and at the last step)
    keep: int = 3                  # checkpoints kept
    resume: bool = True            # continue from the latest checkpoint in output_dir/checkpoints
    remat: bool = False
    export: ExportSpec = dataclasses.field(default_factory=ExportSpec)
    output_dir: str = "runs/train"
    progress: bool = True

    def __post_init__(self):
        if self.method not in ("lora", "full"):
            raise ValueError(f"method must be 'lora' or 'full', got {self.method!r}")
        if self.steps < 1 or self.save_every < 1:
            raise ValueError("steps and save_every must be >= 1")


def _examples(spec: DataSpec, tokenizer):
    if spec.format == "arithmetic":
        rng = random.Random(spec.seed)
        draw = functools.partial(problem, rng, max_digits=spec.max_digits, subtraction=spec.subtraction,
                                 chains=spec.chains)
        return [sft_example(conversation(*draw()), tokenizer, spec.loss_on) for _ in range(spec.count)]
    if not os.path.isfile(spec.path):
        raise FileNotFoundError(f"data.path: no such file {spec.path!r}")
    if spec.format == "sft":
        return sft_examples(spec.path, tokenizer, spec.loss_on)
    return text_file_examples(spec.path, tokenizer, spec.seq_len)


def _metrics_row(step: int, m: dict, seconds: float) -> dict:
    row = {"step": step}
    for k, v in m.items():
        v = np.asarray(v)
        row[k] = v.tolist() if v.ndim else float(v)
    row["tokens_per_s"] = row["tokens"] / seconds if seconds > 0 else None
    return row


def _rewrite_metrics(path: str, upto: int) -> list[dict]:
    """Keeps the rows of steps <= `upto` (a resumed run continues the file where its checkpoint was)."""
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            rows = [r for r in (json.loads(line) for line in f if line.strip()) if r["step"] <= upto]
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(path + ".tmp", path)
    return rows


def plot_loss(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["nll"] for r in rows], label="token NLL")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(cfg: TrainJobConfig) -> dict:
    model, tokenizer = load_model_and_tokenizer(cfg.model, progress=cfg.progress, training=True)
    model.remat = cfg.remat
    if cfg.method == "lora":
        add_lora(model, cfg.lora, seed=cfg.data.seed)
    batches = Batches(_examples(cfg.data, tokenizer), cfg.data.seq_len, cfg.data.batch_size, seed=cfg.data.seed)
    trainer = Trainer(model, cfg.method, cfg.optim, cfg.loss, seed=cfg.data.seed)
    ckpts = Checkpoints(os.path.join(cfg.output_dir, "checkpoints"), keep=cfg.keep)
    metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
    state, start = trainer.init(), 0
    if cfg.resume and ckpts.latest() is not None:
        start = ckpts.latest()
        state, extra = ckpts.restore(start, state)
        batches.restore(extra["data"])
    rows = _rewrite_metrics(metrics_path, start)
    t_start = time.perf_counter()
    with open(metrics_path, "a") as log, tqdm(total=cfg.steps, initial=start, disable=not cfg.progress,
                                              desc=cfg.name, unit="step") as bar:
        for step in range(start + 1, cfg.steps + 1):
            batch = next(batches)
            t0 = time.perf_counter()
            state, m = trainer.step(state, batch)
            m = jax.device_get(m)
            row = _metrics_row(step, m, time.perf_counter() - t0)
            rows.append(row)
            log.write(json.dumps(row) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{row['nll']:.4f}", tok_s=f"{row['tokens_per_s'] or 0:.0f}")
            bar.update(1)
            if step % cfg.save_every == 0 or step == cfg.steps:
                ckpts.save(step, state, {"step": step, "data": batches.state()})
    ckpts.close()
    trained = trainer.model(state)
    out = {"steps": cfg.steps, "resumed_from": start, "train_seconds": time.perf_counter() - t_start,
           "final_loss": rows[-1]["nll"] if rows else None, "first_loss": rows[0]["nll"] if rows else None,
           "checkpoints": ckpts.folder}
    if rows:
        plot_loss(rows, os.path.join(cfg.output_dir, "loss.png"))
    if cfg.method == "lora" and cfg.export.adapters:
        out["adapters"] = str(save_adapters(trained, os.path.join(cfg.output_dir, "adapters"), cfg.lora))
    if cfg.export.model:
        folder = os.path.join(cfg.output_dir, "model")
        (export_pretrained if cfg.method == "lora" else save_pretrained)(trained, folder, experts=cfg.export.experts)
        save_tokenizer_info(tokenizer, folder)
        if cfg.data.format == "arithmetic":  # trained without a system message: chat must not add one
            with open(os.path.join(folder, CHAT_FILE), "w") as f:
                json.dump({"system_message": False}, f)
        out["model_dir"] = folder
    return out
