"""Likelihood evaluation against transformers' GptOssForCausalLM (the tiny fp32 parity model): per-token
log-probabilities with and without sliding windows (each token checked against a forward of exactly the context the
scheme promises), perplexity / bits per byte of texts, and multiple choice with each normalisation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from parity_models import hf_forward, sample_tokens

import gptoss
from gptoss.eval import multiple_choice, perplexity, read_texts, token_logprobs
from gptoss.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def ours(hf_dense_ckpt):
    return gptoss.from_pretrained(hf_dense_ckpt, dtype="float32", progress=False)


def _hf_logprob(hf, context: np.ndarray, token: int) -> float:
    """log p(token | context) from one transformers forward of exactly `context`."""
    with torch.no_grad():
        logits = hf_forward(hf, context[None])[0, -1].astype(np.float64)
    return float(logits[token] - np.log(np.exp(logits - logits.max()).sum()) - logits.max())


def _hf_all(hf, doc: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        logits = hf_forward(hf, doc[None, :-1])[0].astype(np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    return logits[np.arange(len(doc) - 1), doc[1:]] - lse


def test_whole_documents_equal_transformers(ours, parity_hf):
    docs = [sample_tokens(1, n, seed=n)[0] for n in (37, 9, 22)]
    got = token_logprobs(ours, docs, batch_size=2)  # three lengths in two batches: padding between rows
    for doc, lp in zip(docs, got):
        want = _hf_all(parity_hf, doc)
        assert lp.shape == (len(doc) - 1,)
        np.testing.assert_allclose(lp, want, rtol=0, atol=1e-4)
        assert abs(lp.sum() - want.sum()) <= 1e-4 * abs(want.sum())


@pytest.mark.parametrize("seq_len, stride", [(12, 5), (8, 1)])
def test_sliding_windows_score_each_token_once_with_the_promised_context(ours, parity_hf, seq_len, stride):
    """Token j is scored by the first window [k*stride, k*stride + seq_len) that reaches it: its context starts at
    that window's start. Checked token by token against transformers on exactly that context."""
    doc = sample_tokens(1, 31, seed=7)[0]
    lp = token_logprobs(ours, [doc], seq_len=seq_len, stride=stride)[0]
    assert lp.shape == (30,) and np.isfinite(lp).all()
    for j in range(1, 31):
        k = max(0, math.ceil((j - seq_len) / stride))
        start = k * stride
        assert j - start >= min(j, seq_len - stride + 1)  # at least seq_len - stride + 1 tokens of context
        assert lp[j - 1] == pytest.approx(_hf_logprob(parity_hf, doc[start:j], int(doc[j])), abs=1e-4), j


def test_perplexity_and_bits_per_byte_of_texts(ours, parity_hf, tmp_path):
    tok = load_tokenizer("harmony_bytes")
    texts = ["The quick brown fox jumps over the lazy dog.", "héllo wörld", "1 + 1 = 2\n" * 4]
    path = tmp_path / "texts.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    assert read_texts(str(path)) == texts
    r = perplexity(ours, tok, read_texts(str(path)), seq_len=24, stride=8)
    total_nll = total_tokens = 0.0
    for t in texts:  # the oracle: every byte scored after <|endoftext|>, each with the window's context
        doc = np.array([tok.endoftext, *tok.encode_ordinary(t)])
        for j in range(1, len(doc)):
            start = max(0, math.ceil((j - 24) / 8)) * 8
            total_nll -= _hf_logprob(parity_hf, doc[start:j], int(doc[j]))
            total_tokens += 1
    nbytes = sum(len(t.encode()) for t in texts)
    assert r["tokens"] == total_tokens == nbytes  # byte-level tokenizer: one token per byte
    assert r["nll"] == pytest.approx(total_nll / total_tokens, rel=1e-4)
    assert r["bits_per_byte"] == pytest.approx(total_nll / math.log(2) / nbytes, rel=1e-4)
    assert r["perplexity"] == pytest.approx(math.exp(r["nll"]), rel=1e-9)


def test_multiple_choice_picks_the_likeliest_choice(ours, parity_hf):
    tok = load_tokenizer("harmony_bytes")
    items = [{"question": "2 + 2 =", "choices": ["3", "4", "five", "22"], "answer": 1},
             {"question": "Colour of the sky?", "choices": ["blue", "green"], "answer": "A"}]

    def oracle(item, norm):
        ctx = tok.encode_ordinary(item["question"] + "\nAnswer:")
        scores = []
        for c in item["choices"]:
            cont = tok.encode_ordinary(" " + c)
            doc = np.array(ctx + cont)
            s = sum(_hf_logprob(parity_hf, doc[:j], int(doc[j])) for j in range(len(ctx), len(doc)))
            scores.append(s / {"sum": 1, "token": len(cont), "byte": len((" " + c).encode())}[norm])
        return scores

    for norm in ("sum", "token", "byte"):
        r = multiple_choice(ours, tok, items, normalization=norm)
        for item, row in zip(items, r["per_item"]):
            want = oracle(item, norm)
            np.testing.assert_allclose(row["scores"], want, rtol=1e-4, atol=1e-4)
            assert row["pick"] == int(np.argmax(want))
        assert r["accuracy"] == sum(row["correct"] for row in r["per_item"]) / 2


def test_bad_input_is_named(ours, tmp_path):
    with pytest.raises(ValueError, match="document 1: needs at least 2 tokens"):
        token_logprobs(ours, [[1, 2, 3], [4]])
    with pytest.raises(ValueError, match="token id 9999 at index 2"):
        token_logprobs(ours, [[1, 2, 9999]])
    with pytest.raises(ValueError, match="stride"):
        token_logprobs(ours, [[1, 2, 3]], seq_len=8, stride=9)
    with pytest.raises(ValueError, match="normalization"):
        multiple_choice(ours, load_tokenizer("harmony_bytes"), [], normalization="mean")
    with pytest.raises(ValueError, match="item 0: missing 'choices'"):
        multiple_choice(ours, load_tokenizer("harmony_bytes"), [{"question": "q", "answer": 0}])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(ValueError, match="line 2 has no field 'text'"):
        read_texts(str(bad))
