"""`gptoss run CONFIG.yaml key=value ...`: resolve the config, run its task, write config + results."""

from __future__ import annotations

import dataclasses
import json
import os
import time

import yaml

from gptoss import runconfig
from gptoss.apps import inference


def _tasks():
    from gptoss.apps import evaluate, train

    return {"generate": (inference.InferenceConfig, inference.run), "train": (train.TrainJobConfig, train.run),
            "eval": (evaluate.EvalJobConfig, evaluate.run)}


def run_config(path: str, overrides: list[str] = ()) -> tuple[str, dict]:
    """Runs the experiment described by `path`; returns (output folder, results)."""
    with open(path) if os.path.exists(path) else _missing(path) as f:
        task = (yaml.safe_load(f) or {}).get("task", "generate")
    for item in overrides:
        if item.startswith("task="):
            task = item.partition("=")[2]
    tasks = _tasks()
    if task not in tasks:
        raise runconfig.RunConfigError(f"{path}: unknown task {task!r}; known: {sorted(tasks)}")
    cls, fn = tasks[task]
    cfg = runconfig.load(path, cls, overrides)
    out = cfg.output_dir
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.yaml"), "w") as f:
        yaml.safe_dump(dataclasses.asdict(cfg), f, sort_keys=False)
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    results = fn(cfg)
    results = {"task": task, "config_file": os.path.abspath(path), "started": started, **results}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    return out, results


def _missing(path):
    raise runconfig.RunConfigError(f"config file not found: {path}")
