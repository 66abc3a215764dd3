"""Generative evaluation: answer extraction and normalisation, pass@k against brute force, the sweep's records and
summary on the demo model (Python's integers are the oracle), and `gptoss run configs/eval/demo-arithmetic.yaml`."""

from __future__ import annotations

import glob
import itertools
import json
import os

import pytest

import gptoss
from gptoss import runconfig
from gptoss.eval.generative import evaluate, extract_choice, extract_number, normalize_number, pass_at_k

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("text, want", [
    ("The answer is 42.", "42"), ("so 99998+7=100005", "100005"), ("It costs $1,234.50 in total", "1234.5"),
    ("\\boxed{17} and then 3", "17"), ("-7", "-7"), ("0042", "42"), ("3.0", "3"), ("no digits", None), (None, None),
])
def test_extract_number(text, want):
    assert extract_number(text) == want


def test_normalize_number():
    assert normalize_number("1,000") == "1000" and normalize_number("+5") == "5" and normalize_number("x1") is None
    assert normalize_number("-0") == "0" and normalize_number(".5") is None and normalize_number("0.50") == "0.5"


@pytest.mark.parametrize("text, want", [("Answer: C", "C"), ("I think (B) is right", "B"), ("**D**", "D"),
                                        ("A", "A"), ("The answer is b", None), ("nothing", None), ("E", None)])
def test_extract_choice(text, want):
    assert extract_choice(text, 4) == want


@pytest.mark.parametrize("n, c, k", [(5, 2, 1), (5, 2, 3), (8, 0, 4), (8, 8, 2), (6, 1, 6), (10, 3, 5)])
def test_pass_at_k_is_the_probability_over_k_subsets(n, c, k):
    outcomes = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(outcomes, k))
    assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets), abs=1e-12)


@pytest.fixture(scope="module")
def demo():
    return gptoss.from_pretrained("demo", dtype="float32", progress=False), gptoss.load_tokenizer("demo")


def test_evaluate_records_and_summary(demo):
    model, tok = demo
    items = [{"question": "What is 4821 + 377?", "answer": 5198}, {"question": "What is 10003 - 7?", "answer": "9996"},
             {"question": "What is 12 + 30?", "answer": "41"}]  # the last reference is wrong on purpose
    r = evaluate(model, tok, items, efforts=["low", "high"], samples=3, temperature=1.0, top_k=3, system=False,
                 max_new_tokens=200, pass_k=[1, 3], batch_size=4)
    assert len(r["samples"]) == 2 * 3 * 3
    for s in r["samples"]:
        assert s["correct"] == (s["extracted"] == str(items[s["item"]]["answer"]))
        assert s["extracted"] == extract_number(s["channels"].get("final"))
        assert s["tokens"] > 0 and "analysis" in s["channels"]
    for effort, summ in r["summary"].items():
        mine = [s for s in r["samples"] if s["effort"] == effort]
        assert summ["accuracy"] == pytest.approx(sum(s["correct"] for s in mine) / len(mine))
        assert summ["pass@1"] == pytest.approx(summ["accuracy"])
        assert summ["pass@3"] >= summ["pass@1"] and summ["truncated"] == 0.0
        assert not any(s["correct"] for s in mine if s["item"] == 2)
    # per-row seeds: the same item and sample index draw the same tokens at both efforts (no system message here)
    low = {(s["item"], s["sample"]): s["completion"] for s in r["samples"] if s["effort"] == "low"}
    high = {(s["item"], s["sample"]): s["completion"] for s in r["samples"] if s["effort"] == "high"}
    assert low == high


def test_bad_items_are_named(demo):
    model, tok = demo
    with pytest.raises(ValueError, match="item 0: needs 'question' and 'answer'"):
        evaluate(model, tok, [{"q": 1}])
    with pytest.raises(ValueError, match="reasoning effort 'max'"):
        evaluate(model, tok, [{"question": "x", "answer": 1}], efforts=["max"])


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "eval", "*.yaml"))))
def test_eval_configs_parse(path):
    from gptoss.apps.evaluate import EvalJobConfig

    assert runconfig.load(path, EvalJobConfig).task == "eval"


@pytest.mark.slow
def test_demo_arithmetic_config_runs(tmp_path):
    from gptoss.apps.runner import run_config

    out, r = run_config(os.path.join(ROOT, "configs/eval/demo-arithmetic.yaml"),
                        [f"output_dir={tmp_path}", "data.count=40", "batch_size=40"])
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["accuracy"] == r["accuracy"] >= 0.85 and results["system_message"] is False
    lines = (tmp_path / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 40 and all(json.loads(line)["channels"].get("final") for line in lines)
