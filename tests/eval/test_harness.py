"""The lm-evaluation-harness adapter, offline: its loglikelihood / loglikelihood_rolling / generate_until against
transformers (the tiny parity model with the byte-level tokenizer), and a small local multiple-choice task over a
local JSON file run through lm_eval.simple_evaluate."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from parity_models import hf_forward

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from gptoss.eval.harness import GptossLM  # noqa: E402
from gptoss.tokenizer import load_tokenizer, save_tokenizer_info  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def folder(hf_dense_ckpt, tmp_path_factory):
    path = tmp_path_factory.mktemp("harness") / "parity"
    shutil.copytree(hf_dense_ckpt, path)
    save_tokenizer_info("harmony_bytes", str(path))
    return path


@pytest.fixture(scope="module")
def lm(folder):
    return GptossLM(pretrained=str(folder), dtype="float32", batch_size=3)


def _req(kind, args, i=0):
    return Instance(request_type=kind, doc={}, arguments=args, idx=i, metadata=("t", i, 1))


def _hf_logprobs(hf, ids):
    with torch.no_grad():
        logits = hf_forward(hf, np.array([ids[:-1]]))[0].astype(np.float64)
    m = logits.max(-1, keepdims=True)
    lse = np.log(np.exp(logits - m).sum(-1)) + m[:, 0]
    return logits[np.arange(len(ids) - 1), ids[1:]] - lse, logits.argmax(-1) == np.asarray(ids[1:])


def test_loglikelihood_equals_transformers(lm, parity_hf):
    tok = load_tokenizer("harmony_bytes")
    pairs = [("The capital of France is", " Paris"), ("1 + 1 =", " 2"), ("", "hello")]
    got = lm.loglikelihood([_req("loglikelihood", p, i) for i, p in enumerate(pairs)])
    for (ctx, cont), (lp, greedy) in zip(pairs, got):
        c = tok.encode_ordinary(ctx) or [tok.endoftext]
        n = len(tok.encode_ordinary(cont))
        want, top = _hf_logprobs(parity_hf, c + tok.encode_ordinary(cont))
        assert lp == pytest.approx(want[-n:].sum(), rel=1e-4) and greedy == bool(top[-n:].all())


def test_rolling_loglikelihood_equals_transformers(lm, parity_hf):
    tok = load_tokenizer("harmony_bytes")
    texts = ["a rolling document", "x" * 5]
    got = lm.loglikelihood_rolling([_req("loglikelihood_rolling", (t,), i) for i, t in enumerate(texts)])
    for t, lp in zip(texts, got):
        want, _ = _hf_logprobs(parity_hf, [tok.endoftext, *tok.encode_ordinary(t)])
        assert lp == pytest.approx(want.sum(), rel=1e-4)


def test_generate_until_is_greedy_and_cut(lm, parity_hf):
    tok = load_tokenizer("harmony_bytes")
    ctx = "Once upon a time"
    full = lm.generate_until([_req("generate_until", (ctx, {"until": [], "max_gen_toks": 12}))])[0]
    ids = tok.encode_ordinary(ctx)
    with torch.no_grad():  # transformers' greedy continuation, token by token
        for _ in range(12):
            nxt = int(hf_forward(parity_hf, np.array([ids]))[0, -1].argmax())
            if nxt == tok.endoftext or nxt >= tok.vocab_size:  # no text for ids past the tokenizer
                break
            ids.append(nxt)
    want = tok.decode(ids[len(tok.encode_ordinary(ctx)):])
    assert full == want and len(want) >= 3, (full, want)
    if len(want) > 2:
        stop = want[2]
        cut = lm.generate_until([_req("generate_until", (ctx, {"until": [stop], "max_gen_toks": 12}))])[0]
        assert cut == want[:want.index(stop)]


def test_a_local_task_runs_offline(lm, tmp_path):
    data = tmp_path / "qa.json"
    data.write_text("\n".join(json.dumps({"q": q, "choices": c, "label": a}) for q, c, a in [
        ("2 + 2 =", ["3", "4", "5"], 1), ("The sky is", ["blue", "loud"], 0), ("Fire is", ["cold", "hot"], 1)]))
    (tmp_path / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{q}}}}"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
""")
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model=lm, tasks=["tiny_mc"], task_manager=TaskManager(include_path=str(tmp_path)))
    acc = out["results"]["tiny_mc"]["acc,none"]
    assert acc in (0.0, 1 / 3, 2 / 3, 1.0)  # three questions
