"""The embedded demo model: it ships inside the package, loads by name, answers held-out arithmetic problems with its
work on the analysis channel (Python's integers are the oracle), and `make demo`'s config shows it; a few dozen
steps of its training config lower the loss."""

from __future__ import annotations

import json
import os
import re

import pytest

import gptoss
from gptoss import cli
from gptoss.io import DEMO_DIR
from gptoss.train.arithmetic import accuracy, ask

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def demo():
    return gptoss.from_pretrained("demo", dtype="float32", progress=False), gptoss.load_tokenizer("demo")


def test_demo_ships_small_and_mxfp4(demo):
    model, tok = demo
    size = sum(os.path.getsize(os.path.join(DEMO_DIR, f)) for f in os.listdir(DEMO_DIR))
    assert size <= 5 * 2**20 and model.experts == "mxfp4" and tok.name == "harmony_bytes"


def test_demo_answers_held_out_problems(demo):
    """Held-out problems (training draws with other seeds); README has the 1,000-problem figures."""
    model, tok = demo
    mixed = accuracy(model, tok, 40, seed=2025, batch_size=40)
    assert mixed["accuracy"] >= 0.85, mixed["wrong"]
    chains = ask(model, tok, ["What is 99998 + 7?", "What is 10003 - 7?", "What's 99999 plus 1?"])
    assert [a["final"] for a in chains] == ["100005", "9996", "100000"], chains


def test_make_demo_config_shows_analysis_and_answer(tmp_path, capsys):
    cli.main(["run", os.path.join(ROOT, "configs/inference/demo.yaml"), f"output_dir={tmp_path}"])
    out = capsys.readouterr().out
    assert "> What is 4821 + 377?" in out and "[analysis]" in out and "[final] 5198" in out
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    for r in results:  # every answer is right (Python is the oracle)
        a, op, b = re.search(r"(\d+) ?(\+|-|plus|minus|from) ?(\d+)", r["prompt"]).groups()
        if op == "from":  # "Subtract b from a."
            a, op, b = b, "-", a
        assert r["final"] == str(int(a) + int(b) if op in ("+", "plus") else int(a) - int(b)), r


@pytest.mark.slow
def test_demo_training_config_lowers_the_loss(tmp_path):
    from gptoss.apps.runner import run_config

    _, r = run_config(os.path.join(ROOT, "configs/train/demo.yaml"),
                      [f"output_dir={tmp_path}", "steps=12", "optim.total_steps=12", "optim.warmup_steps=2",
                       "data.count=120", "data.batch_size=8", "save_every=100", "export.experts=mxfp4",
                       "progress=false"])
    assert r["final_loss"] < 0.7 * r["first_loss"]
    with open(os.path.join(r["model_dir"], "gptoss_chat.json")) as f:  # trained without a system message
        assert json.load(f) == {"system_message": False}
