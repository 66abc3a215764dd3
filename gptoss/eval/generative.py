"""Generative task evaluation: harmony prompts at chosen reasoning efforts, n samples per item with per-row seeds,
the answer taken from the final channel by the tolerant parser, numeric / letter extraction, pass@1 and pass@k,
and how often outputs were truncated or malformed."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np

from gptoss import harmony
from gptoss.engine import generate

EFFORTS = ("low", "medium", "high")
LETTERS = "ABCDEFGHIJ"


def normalize_number(text: str) -> str | None:
    """'1,234.50' -> '1234.5', '-07' -> '-7', '3.0' -> '3'; None if `text` is not a number."""
    t = text.strip().replace(",", "").replace("$", "").rstrip(".")
    if not re.fullmatch(r"[-+]?\d+(\.\d+)?", t):
        return None
    if "." in t:
        t = t.rstrip("0").rstrip(".")
    sign = "-" if t.startswith("-") else ""
    t = t.lstrip("+-").lstrip("0") or "0"
    if t.startswith("."):
        t = "0" + t
    return sign + t if t != "0" else "0"


def extract_number(text: str | None) -> str | None:
    """The answer of a numeric task (GSM8K / AIME style): a \\boxed{...} value, else the last number in the text."""
    if not text:
        return None
    boxed = re.findall(r"\\boxed\{([^{}]*)\}", text)
    for candidate in reversed(boxed):
        n = normalize_number(candidate)
        if n is not None:
            return n
    numbers = re.findall(r"[-+]?\$?\d[\d,]*(?:\.\d+)?", text)
    return normalize_number(numbers[-1]) if numbers else None


def extract_choice(text: str | None, n_choices: int = 4) -> str | None:
    """The letter of a multiple-choice answer (GPQA style): 'Answer: C', '(C)', '**C**', or a lone letter."""
    if not text:
        return None
    letters = LETTERS[:n_choices]
    for pattern in (rf"[Aa]nswer\s*(?:is)?\s*[:\-]?\s*\(?\**([{letters}])\b", rf"\(([{letters}])\)",
                    rf"\*\*([{letters}])\*\*", rf"^\s*([{letters}])[\s.):]*$", rf"\b([{letters}])\b"):
        found = re.findall(pattern, text, flags=re.M)
        if found:
            return found[-1]
    return None


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al., 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def render(question: str, tokenizer, *, effort: str, system: bool) -> list[int]:
    convo = ([harmony.system_message(reasoning_effort=effort)] if system else []) + [harmony.message("user", question)]
    return harmony.render_conversation_for_completion(convo, tokenizer=tokenizer)


def evaluate(model, tokenizer, items: Sequence[dict], *, kind: str = "number", efforts: Sequence[str] = ("low",),
             samples: int = 1, seed: int = 0, max_new_tokens: int = 1024, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, system: bool = True, batch_size: int = 16,
             pass_k: Sequence[int] = (1,)) -> dict:
    """Runs every item `samples` times at each effort. Items: {"question": str, "answer": str|int} (kind
    "number") or with "choices" (kind "choice": the question is shown with lettered choices; the answer is an
    index or a letter). Returns {"summary": {effort: {...}}, "samples": [per-sample records]}."""
    if kind not in ("number", "choice"):
        raise ValueError(f"kind must be 'number' or 'choice', got {kind!r}")
    bad = [e for e in efforts if e not in EFFORTS]
    if bad:
        raise ValueError(f"reasoning effort {bad[0]!r} is not one of {EFFORTS}")
    questions, answers = [], []
    for i, item in enumerate(items):
        if "question" not in item or "answer" not in item:
            raise ValueError(f"item {i}: needs 'question' and 'answer'")
        q, a = str(item["question"]), item["answer"]
        if kind == "choice":
            choices = item.get("choices")
            if not choices:
                raise ValueError(f"item {i}: a choice item needs 'choices'")
            q += "\n\n" + "\n".join(f"({LETTERS[j]}) {c}" for j, c in enumerate(choices))
            q += "\n\nAnswer with the letter of the correct choice."
            a = LETTERS[a] if isinstance(a, int) else str(a).strip().upper()
        else:
            a = normalize_number(str(a))
        questions.append(q)
        answers.append(a)
    stop = list(tokenizer.stop_tokens_for_assistant_actions)
    records, summary = [], {}
    for effort in efforts:
        rows = [(i, s) for i in range(len(questions)) for s in range(samples)]
        prompts = {i: render(questions[i], tokenizer, effort=effort, system=system) for i in range(len(questions))}
        mine = []
        for b in range(0, len(rows), batch_size):
            chunk = rows[b:b + batch_size]
            out = generate(model, [prompts[i] for i, _ in chunk], max_new_tokens=max_new_tokens,
                           temperature=temperature, top_p=top_p, top_k=top_k, stop_tokens=stop,
                           seed=[seed * 1_000_003 + i * 1009 + s for i, s in chunk])
            for (i, s), new, finished in zip(chunk, out.tokens, out.finished):
                messages, problems = harmony.parse_completion(new, "assistant", tokenizer=tokenizer)
                channels = {m.channel or "": m.text for m in messages}
                final = channels.get("final")
                n_choices = len(items[i].get("choices") or []) or 4
                got = extract_number(final) if kind == "number" else extract_choice(final, n_choices)
                mine.append({"item": i, "sample": s, "effort": effort, "question": questions[i],
                             "answer": answers[i], "completion": tokenizer.decode(new), "channels": channels,
                             "extracted": got, "correct": got is not None and got == answers[i],
                             "tokens": len(new), "truncated": not finished,
                             "malformed": bool(problems) or final is None, "problems": problems})
        records += mine
        by_item = {}
        for r in mine:
            by_item.setdefault(r["item"], []).append(r["correct"])
        summary[effort] = {
            "items": len(questions), "samples_per_item": samples,
            **{f"pass@{k}": float(np.mean([pass_at_k(len(v), sum(v), k) for v in by_item.values()]))
               for k in pass_k if k <= samples},
            "accuracy": float(np.mean([r["correct"] for r in mine])),
            "mean_tokens": float(np.mean([r["tokens"] for r in mine])),
            "truncated": float(np.mean([r["truncated"] for r in mine])),
            "malformed": float(np.mean([r["malformed"] for r in mine]))}
    return {"summary": summary, "samples": records}


def plot_accuracy_vs_tokens(summary: dict, path: str) -> None:
    """Accuracy against mean tokens used, one point per reasoning effort."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    xs = [summary[e]["mean_tokens"] for e in summary]
    ys = [summary[e]["accuracy"] for e in summary]
    ax.plot(xs, ys, "o-")
    for e, x, y in zip(summary, xs, ys):
        ax.annotate(e, (x, y), textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("mean tokens per answer")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
