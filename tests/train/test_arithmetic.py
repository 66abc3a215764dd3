"""The demo task's worked solutions are right (Python integers are the oracle) and render as harmony."""

from __future__ import annotations

import random
import re

from gptoss.harmony import render_conversation_for_training
from gptoss.tokenizer import load_tokenizer
from gptoss.train.arithmetic import _chain, add_work, conversation, problem, sub_work


def _column_digits(work: str) -> str:
    """The written digit of each column (units first), read back from the work lines; checks that every line's
    digits-so-far are the previous line's with that digit in front."""
    digits = ""
    for line in work.splitlines()[:-1]:
        m = re.fullmatch(r"(?:[\d+\-]+=(\d+)( carry 1| borrow 1)?|carry 1) -> (\d+)", line)
        assert m, line
        digit = m.group(1)[-1] if m.group(1) else "1"
        assert m.group(3) == digit + digits, line
        digits = m.group(3)
    return digits


def test_column_work_is_right():
    rng = random.Random(0)
    for _ in range(2000):
        a, b = rng.randint(0, 99999), rng.randint(0, 99999)
        work = add_work(a, b)
        assert work.endswith(f"so {a}+{b}={a + b}") and int(_column_digits(work)) == a + b
        hi, lo = max(a, b), min(a, b)
        work = sub_work(hi, lo)
        assert work.endswith(f"so {hi}-{lo}={hi - lo}") and int(_column_digits(work)) == hi - lo
    assert add_work(99998, 7).splitlines() == [
        "8+7=15 carry 1 -> 5", "9+0+1=10 carry 1 -> 05", "9+0+1=10 carry 1 -> 005", "9+0+1=10 carry 1 -> 0005",
        "9+0+1=10 carry 1 -> 00005", "carry 1 -> 100005", "so 99998+7=100005"]
    assert sub_work(10003, 7).splitlines() == [
        "3-7=6 borrow 1 -> 6", "0-0-1=9 borrow 1 -> 96", "0-0-1=9 borrow 1 -> 996", "0-0-1=9 borrow 1 -> 9996",
        "1-0-1=0 -> 09996", "so 10003-7=9996"]


def test_chain_problems_carry_through_the_top_column():
    rng = random.Random(2)
    for _ in range(2000):
        a, b = _chain(rng, 5, sub=False)
        assert len(str(a + b)) > max(len(str(a)), len(str(b)))
        assert add_work(a, b).splitlines()[-2] == f"carry 1 -> {a + b}"
        a, b = _chain(rng, 5, sub=True)
        assert a >= b and len(str(a - b)) < len(str(a))
    shares = [problem(rng, subtraction=0.3, chains=0.1) for _ in range(4000)]
    subs = sum("+" not in work.splitlines()[0] for _, work, _ in shares) / len(shares)
    assert 0.27 < subs < 0.33


def test_problems_render_as_harmony():
    rng = random.Random(1)
    tok = load_tokenizer("harmony_bytes")
    for _ in range(50):
        q, work, answer = problem(rng)
        a, b = map(int, re.findall(r"\d+", q))
        assert answer in (a + b, abs(a - b))  # "Subtract {b} from {a}." names b first
        text = tok.decode(render_conversation_for_training(conversation(q, work, answer), tokenizer=tok))
        assert text.endswith(f"<|start|>assistant<|channel|>final<|message|>{answer}<|return|>")
