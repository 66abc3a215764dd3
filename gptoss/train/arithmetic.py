"""Synthetic harmony task for the demo model: addition (and subtraction) of numbers of 1 to 5 digits, asked as a
user would, with the column-by-column work on the analysis channel and the answer on the final channel."""

from __future__ import annotations

import json
import random

ADD_WORDINGS = ("What is {a} + {b}?", "What's {a} plus {b}?", "Compute {a} + {b}.", "{a} + {b} = ?",
                "Add {a} and {b}.", "what is {a}+{b}", "Please calculate {a} + {b}.", "How much is {a} plus {b}?")
# The task's share of subtractions (the held-out distribution); training may oversample them.
SUBTRACTION = 0.3
CHAINS = 0.1  # share of problems built for long carry/borrow chains (99998 + 7)
SUB_WORDINGS = ("What is {a} - {b}?", "What's {a} minus {b}?", "Compute {a} - {b}.", "{a} - {b} = ?",
                "Subtract {b} from {a}.", "what is {a}-{b}", "How much is {a} minus {b}?")


def add_work(a: int, b: int) -> str:
    """Column addition from the units up: 'd1+d2(+1)=s carry 1 -> digits so far' per column, then the sum.

    Each line repeats the result's digits so far: the answer is then a copy of the last line, where a summary
    gathered from the column lines had to count identical lines (99998 + 7 has four '9+0+1=10 carry 1')."""
    xs, ys = str(a)[::-1], str(b)[::-1]
    lines, carry, digits = [], 0, ""
    for i in range(max(len(xs), len(ys))):
        x, y = int(xs[i]) if i < len(xs) else 0, int(ys[i]) if i < len(ys) else 0
        s = x + y + carry
        terms = f"{x}+{y}" + ("+1" if carry else "")
        carry, digits = s // 10, str(s % 10) + digits
        lines.append(f"{terms}={s}" + (" carry 1" if carry else "") + f" -> {digits}")
    if carry:
        lines.append(f"carry 1 -> 1{digits}")
    return "\n".join(lines) + f"\nso {a}+{b}={a + b}"


def sub_work(a: int, b: int) -> str:
    """Column subtraction (a >= b) from the units up, written like the addition: 'd1-d2(-1)=d borrow 1 -> digits so
    far' per column, where '-1' is the borrow taken by the column below, then the difference (leading zeros gone)."""
    xs, ys = str(a)[::-1], str(b)[::-1]
    lines, borrow, digits = [], 0, ""
    for i in range(len(xs)):
        x, y = int(xs[i]), int(ys[i]) if i < len(ys) else 0
        d = x - y - borrow
        terms = f"{x}-{y}" + ("-1" if borrow else "")
        borrow, digits = int(d < 0), str(d % 10) + digits
        lines.append(f"{terms}={d % 10}" + (" borrow 1" if borrow else "") + f" -> {digits}")
    return "\n".join(lines) + f"\nso {a}-{b}={a - b}"


def _number(rng: random.Random, max_digits: int) -> int:
    digits = rng.randint(1, max_digits)
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def _chain(rng: random.Random, max_digits: int, sub: bool) -> tuple[int, int]:
    """A pair whose carries (borrows) run through most columns: 99998 + 7, 10003 - 7, 9950 + 87."""
    digits = rng.randint(2, max_digits)
    small = rng.randint(1, 10 ** rng.randint(1, digits - 1) - 1)
    if sub:
        a = 10 ** (digits - 1) + rng.randint(0, small - 1)
        return a, rng.randint(a - 10 ** (digits - 1) + 1, min(a, 10 ** len(str(small)) - 1))
    return 10**digits - small, rng.randint(small, 10 ** len(str(small)) - 1)


def problem(rng: random.Random, *, max_digits: int = 5, subtraction: float = SUBTRACTION,
            chains: float = CHAINS) -> tuple[str, str, int]:
    """(question, analysis, answer) of one random problem: a subtraction with probability `subtraction`, operands
    built for a long carry/borrow chain with probability `chains`, otherwise uniform digit counts then digits."""
    sub = rng.random() < subtraction
    if max_digits >= 2 and rng.random() < chains:
        a, b = _chain(rng, max_digits, sub)
    else:
        a, b = _number(rng, max_digits), _number(rng, max_digits)
    if rng.random() < 0.5:
        a, b = b, a
    if sub:
        a, b = max(a, b), min(a, b)
        return rng.choice(SUB_WORDINGS).format(a=a, b=b), sub_work(a, b), a - b
    return rng.choice(ADD_WORDINGS).format(a=a, b=b), add_work(a, b), a + b


def conversation(question: str, analysis: str, answer: int) -> dict:
    """openai-harmony JSON of one solved problem (no system message: the demo model is trained without one)."""
    return {"messages": [
        {"role": "user", "content": [{"type": "text", "text": question}]},
        {"role": "assistant", "channel": "analysis", "content": [{"type": "text", "text": analysis}]},
        {"role": "assistant", "channel": "final", "content": [{"type": "text", "text": str(answer)}]},
    ]}


def write_jsonl(path, n: int, *, seed: int = 0, max_digits: int = 5, subtraction: float = SUBTRACTION,
                chains: float = CHAINS) -> str:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            item = problem(rng, max_digits=max_digits, subtraction=subtraction, chains=chains)
            f.write(json.dumps(conversation(*item)) + "\n")
    return str(path)


def ask(model, tokenizer, questions: list[str], *, max_new_tokens: int = 256, batch_size: int = 64) -> list[dict]:
    """Greedy harmony answers: per question {"analysis", "final", "problems"} (the final channel's text)."""
    from gptoss.engine import generate
    from gptoss.harmony import message, parse_completion, render_conversation_for_completion

    out = []
    for i in range(0, len(questions), batch_size):
        chunk = questions[i:i + batch_size]
        prompts = [render_conversation_for_completion([message("user", q)], tokenizer=tokenizer) for q in chunk]
        gen = generate(model, prompts, max_new_tokens=max_new_tokens,
                       stop_tokens=list(tokenizer.stop_tokens_for_assistant_actions))
        for new in gen.tokens:
            messages, problems = parse_completion(new, "assistant", tokenizer=tokenizer)
            by_channel = {m.channel: m.text for m in messages}
            out.append({"analysis": by_channel.get("analysis"), "final": by_channel.get("final"),
                        "problems": problems})
    return out


def accuracy(model, tokenizer, n: int = 1000, *, seed: int = 12345, max_digits: int = 5, chains: float = CHAINS,
             subtraction: float = SUBTRACTION, batch_size: int = 64) -> dict:
    """Exact-match accuracy of the final answer on `n` problems drawn with `seed` (training uses other seeds)."""
    rng = random.Random(seed)
    items = [problem(rng, max_digits=max_digits, subtraction=subtraction, chains=chains) for _ in range(n)]
    answers = ask(model, tokenizer, [q for q, _, _ in items], batch_size=batch_size,
                  max_new_tokens=40 * max_digits + 40)
    right = [a["final"] is not None and a["final"].strip() == str(want) for a, (_, _, want) in zip(answers, items)]
    return {"n": n, "max_digits": max_digits, "accuracy": sum(right) / n,
            "wrong": [{"question": q, "want": w, "got": a["final"]} for (q, _, w), a, ok in zip(items, answers, right)
                      if not ok][:10]}
