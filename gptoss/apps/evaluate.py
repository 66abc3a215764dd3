"""The evaluation job (`task: eval`): a generative task (harmony prompts, reasoning-effort sweep, n samples per item,
pass@k) or a likelihood task (multiple choice, perplexity) over the demo's arithmetic problems or a local JSONL file.
Writes results.json (the summary; `accuracy` of the first effort at the top level), samples.jsonl (every sample)
and, for a sweep, accuracy_vs_tokens.png."""

from __future__ import annotations

import dataclasses
import json
import os
import random

from gptoss.apps.loading import ModelSpec, chat_defaults, load_model_and_tokenizer
from gptoss.eval.generative import evaluate, plot_accuracy_vs_tokens
from gptoss.eval.likelihood import multiple_choice, perplexity, read_texts
from gptoss.train.arithmetic import problem

METHODS = ("generate", "multiple_choice", "perplexity")


@dataclasses.dataclass
class EvalData:
    format: str = "arithmetic"       # "arithmetic" (the demo's task) or "jsonl" (path)
    path: str | None = None
    count: int = 100                 # arithmetic: problems drawn; jsonl: at most this many lines (0 = all)
    seed: int = 12345                # arithmetic: never a training seed
    max_digits: int = 5
    question_field: str = "question"
    answer_field: str = "answer"     # GSM8K's "... #### 42" is cut at "####"
    choices_field: str = "choices"
    text_field: str = "text"         # perplexity

    def __post_init__(self):
        if self.format not in ("arithmetic", "jsonl"):
            raise ValueError(f"data.format must be 'arithmetic' or 'jsonl', got {self.format!r}")
        if self.format == "jsonl" and not self.path:
            raise ValueError("data.path: a jsonl file is needed for format 'jsonl'")


@dataclasses.dataclass
class EvalJobConfig:
    model: ModelSpec
    data: EvalData = dataclasses.field(default_factory=EvalData)
    task: str = "eval"
    name: str = "eval"
    method: str = "generate"
    kind: str = "number"             # generate: "number" (numeric answer) or "choice" (letter)
    efforts: list[str] = dataclasses.field(default_factory=lambda: ["low"])
    samples: int = 1                 # per item; pass@k for k in pass_k up to samples
    pass_k: list[int] = dataclasses.field(default_factory=lambda: [1])
    seed: int = 0
    max_new_tokens: int = 1024
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    system: bool | None = None       # a system message (with the effort) first; None: the checkpoint's default
    normalization: str = "sum"       # multiple_choice: "sum", "token" or "byte"
    seq_len: int | None = None       # perplexity window (default: the model's context)
    stride: int | None = None
    batch_size: int = 16
    output_dir: str = "runs/eval"
    progress: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.samples < 1:
            raise ValueError("samples must be >= 1")


def _items(spec: EvalData) -> list[dict]:
    if spec.format == "arithmetic":
        rng = random.Random(spec.seed)
        return [{"question": q, "answer": a} for q, _, a in
                (problem(rng, max_digits=spec.max_digits) for _ in range(spec.count))]
    if not os.path.isfile(spec.path):
        raise FileNotFoundError(f"data.path: no such file {spec.path!r}")
    items = []
    with open(spec.path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            missing = [k for k in (spec.question_field, spec.answer_field) if k not in row]
            if missing:
                raise ValueError(f"{spec.path}: line {n} has no field {missing[0]!r}")
            answer = row[spec.answer_field]
            if isinstance(answer, str) and "####" in answer:
                answer = answer.split("####")[-1].strip()
            item = {"question": row[spec.question_field], "answer": answer}
            if spec.choices_field in row:
                item["choices"] = row[spec.choices_field]
            items.append(item)
            if spec.count and len(items) == spec.count:
                break
    return items


def run(cfg: EvalJobConfig) -> dict:
    model, tokenizer = load_model_and_tokenizer(cfg.model, progress=cfg.progress)
    os.makedirs(cfg.output_dir, exist_ok=True)
    if cfg.method == "perplexity":
        texts = read_texts(cfg.data.path, cfg.data.text_field) if cfg.data.path else \
            [i["question"] for i in _items(cfg.data)]
        return perplexity(model, tokenizer, texts, seq_len=cfg.seq_len, stride=cfg.stride, batch_size=cfg.batch_size)
    items = _items(cfg.data)
    if cfg.method == "multiple_choice":
        r = multiple_choice(model, tokenizer, items, normalization=cfg.normalization, batch_size=cfg.batch_size)
        return {"accuracy": r["accuracy"], **r}
    system = chat_defaults(cfg.model).get("system_message", True) if cfg.system is None else cfg.system
    r = evaluate(model, tokenizer, items, kind=cfg.kind, efforts=cfg.efforts, samples=cfg.samples, seed=cfg.seed,
                 max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                 system=system, batch_size=cfg.batch_size, pass_k=cfg.pass_k)
    with open(os.path.join(cfg.output_dir, "samples.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(s) + "\n" for s in r["samples"])
    if len(cfg.efforts) > 1:
        plot_accuracy_vs_tokens(r["summary"], os.path.join(cfg.output_dir, "accuracy_vs_tokens.png"))
    first = r["summary"][cfg.efforts[0]]
    return {"accuracy": first["accuracy"], "summary": r["summary"], "system_message": system,
            "samples_file": os.path.join(cfg.output_dir, "samples.jsonl")}
