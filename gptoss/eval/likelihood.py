"""Likelihood evaluation: per-token log-probabilities of documents (a sliding window for documents longer than the
context), perplexity / mean NLL / bits per byte over texts, and multiple choice by the log-likelihood of each choice.

Every scored token is scored once, with as much preceding context as the window allows: windows of `seq_len` tokens
start every `stride` tokens, and each window scores only the tokens the previous one did not (the scheme of
transformers' perplexity guide and lm-eval's rolling log-likelihood). A document's first token is scored after a
prefix token (`<|endoftext|>` by default), so bits per byte cover every byte of the text."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptoss.engine.generate import bucket

NORMALIZATIONS = ("sum", "token", "byte")


@functools.partial(jax.jit, static_argnums=(0, 5))
def _window_logprobs(graphdef, state, tokens_BT, positions_BT, targets_BT, chunk):
    """log p(targets[b, t] | tokens[b, :t+1]) [B, T] and whether each target is the argmax, the logits made `chunk`
    rows at a time (never [B, T, V])."""
    model = nnx.merge(graphdef, state)
    x_BTD, _, _ = model.hidden_states(tokens_BT, positions_BT, None, in_order=True)
    B, T, D = x_BTD.shape
    N = B * T
    C = min(chunk, N)
    pad = -N % C
    x_ND = jnp.pad(x_BTD.reshape(N, D), ((0, pad), (0, 0)))
    t_N = jnp.pad(targets_BT.reshape(N), (0, pad))

    def rows(args):
        x_CD, t_C = args
        logits_CV = model.logits(x_CD[None])[0]
        lp_C = jnp.take_along_axis(jax.nn.log_softmax(logits_CV, axis=-1), t_C[:, None], axis=-1)[:, 0]
        return lp_C, jnp.argmax(logits_CV, axis=-1) == t_C

    lp, greedy = jax.lax.map(rows, (x_ND.reshape(-1, C, D), t_N.reshape(-1, C)))
    return lp.reshape(-1)[:N].reshape(B, T), greedy.reshape(-1)[:N].reshape(B, T)


@dataclasses.dataclass(frozen=True)
class _Window:
    doc: int
    start: int  # first input token; input row r predicts token start + r + 1
    length: int  # input tokens
    first_scored: int  # the first row whose prediction no earlier window made


def _windows(lengths: Sequence[int], seq_len: int, stride: int) -> list[_Window]:
    """Windows over documents of `lengths` tokens, which score tokens 1..n-1 once each."""
    out = []
    for d, n in enumerate(lengths):
        done, start = 0, 0  # tokens 1..done are scored
        while done < n - 1:
            end = min(start + seq_len, n - 1)
            out.append(_Window(d, start, end - start, done - start))  # stride <= seq_len: start <= done
            done, start = end, start + stride
    return out


def token_logprobs(model, docs: Sequence[Sequence[int]], *, seq_len: int | None = None, stride: int | None = None,
                   batch_size: int = 8, chunk: int = 512, with_greedy: bool = False):
    """For each document (token ids), log p(doc[i] | doc[:i]) for i = 1..len-1 (float32 [len - 1]), each token
    scored once with up to `seq_len` tokens of context (default: the model's context), windows every `stride`
    tokens (default seq_len // 2). `with_greedy`: also, per token, whether it is the model's argmax there."""
    cfg = model.config
    seq_len = min(seq_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
    stride = stride or max(1, seq_len // 2)
    if not 1 <= stride <= seq_len:
        raise ValueError(f"stride must be in [1, seq_len={seq_len}], got {stride}")
    docs = [np.asarray(d, np.int64) for d in docs]
    for i, d in enumerate(docs):
        if d.ndim != 1 or len(d) < 2:
            raise ValueError(f"document {i}: needs at least 2 tokens (a prefix and one to score), got {d.shape}")
        bad = np.flatnonzero((d < 0) | (d >= cfg.vocab_size))
        if bad.size:
            raise ValueError(f"document {i}: token id {int(d[bad[0]])} at index {int(bad[0])} is outside the "
                             f"vocabulary [0, {cfg.vocab_size})")
    out = [np.full(len(d) - 1, np.nan, np.float32) for d in docs]
    greedy = [np.zeros(len(d) - 1, bool) for d in docs]
    windows = sorted(_windows([len(d) for d in docs], seq_len, stride), key=lambda w: -w.length)
    graphdef, state = nnx.split(model)
    for i in range(0, len(windows), batch_size):
        group = windows[i:i + batch_size]
        T = min(bucket(group[0].length), seq_len)  # few compiled shapes
        tokens = np.zeros((len(group), T), np.int32)
        targets = np.zeros((len(group), T), np.int32)
        positions = np.full((len(group), T), -1, np.int32)
        for r, w in enumerate(group):
            d = docs[w.doc]
            tokens[r, :w.length] = d[w.start:w.start + w.length]
            targets[r, :w.length] = d[w.start + 1:w.start + w.length + 1]
            positions[r, :w.length] = np.arange(w.length)
        lp, top = (np.asarray(a) for a in _window_logprobs(graphdef, state, tokens, positions, targets, chunk))
        for r, w in enumerate(group):
            k = w.first_scored
            out[w.doc][w.start + k:w.start + w.length] = lp[r, k:w.length]
            greedy[w.doc][w.start + k:w.start + w.length] = top[r, k:w.length]
    return (out, greedy) if with_greedy else out


def prefix_id(tokenizer) -> int:
    """The token a document is scored after, so its first token is scored too (<|endoftext|>)."""
    for name in ("endoftext", "eot"):
        if getattr(tokenizer, name, None) is not None:
            return int(getattr(tokenizer, name))
    raise ValueError(f"tokenizer {tokenizer!r} has no <|endoftext|> to score a document's first token after")


def perplexity(model, tokenizer, texts: Iterable[str], *, seq_len: int | None = None, stride: int | None = None,
               batch_size: int = 8) -> dict:
    """Mean NLL per token (nats), perplexity and bits per byte over `texts`, every token of every text scored
    (the first after the prefix token), plus per-text figures."""
    texts = list(texts)
    if not texts:
        raise ValueError("perplexity: no texts")
    prefix = prefix_id(tokenizer)
    docs = [[prefix, *tokenizer.encode_ordinary(t)] for t in texts]
    empty = [i for i, d in enumerate(docs) if len(d) < 2]
    if empty:
        raise ValueError(f"perplexity: text {empty[0]} is empty")
    lps = token_logprobs(model, docs, seq_len=seq_len, stride=stride, batch_size=batch_size)
    nll = [float(-lp.astype(np.float64).sum()) for lp in lps]
    tokens = [len(lp) for lp in lps]
    nbytes = [len(t.encode("utf-8")) for t in texts]
    total_nll, total_tokens, total_bytes = sum(nll), sum(tokens), sum(nbytes)
    return {"texts": len(texts), "tokens": total_tokens, "bytes": total_bytes, "nll": total_nll / total_tokens,
            "perplexity": math.exp(total_nll / total_tokens), "bits_per_byte": total_nll / math.log(2) / total_bytes,
            "per_text": [{"tokens": n, "bytes": b, "nll": s / n} for s, n, b in zip(nll, tokens, nbytes)]}


def read_texts(path: str, field: str = "text") -> list[str]:
    """A .jsonl file's `field` of each line, or a plain text file as one document."""
    if str(path).endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        missing = [i for i, r in enumerate(rows) if field not in r]
        if missing:
            raise ValueError(f"{path}: line {missing[0] + 1} has no field {field!r}")
        return [r[field] for r in rows]
    with open(path, encoding="utf-8") as f:
        return [f.read()]


def choice_logprobs(model, tokenizer, context: str, choices: Sequence[str], *, batch_size: int = 8) -> list[dict]:
    """For each choice: the summed log-probability of its tokens after `context`, its token and byte counts."""
    ctx = tokenizer.encode_ordinary(context)
    if not ctx:
        raise ValueError("choice_logprobs: empty context")
    conts = [tokenizer.encode_ordinary(c) for c in choices]
    bad = [i for i, c in enumerate(conts) if not c]
    if bad:
        raise ValueError(f"choice {bad[0]} ({choices[bad[0]]!r}) has no tokens")
    lps = token_logprobs(model, [ctx + c for c in conts], batch_size=batch_size)
    return [{"logprob": float(lp[len(ctx) - 1:].astype(np.float64).sum()), "tokens": len(c),
             "bytes": len(choice.encode("utf-8"))} for lp, c, choice in zip(lps, conts, choices)]


def multiple_choice(model, tokenizer, items: Iterable[dict], *, normalization: str = "sum",
                    template: str = "{question}\nAnswer:", batch_size: int = 8) -> dict:
    """Accuracy of picking the choice with the highest log-likelihood after the question (MMLU style). Items:
    {"question": str, "choices": [str, ...], "answer": index or letter}; each choice is scored as " " + choice.
    `normalization`: "sum" (total log-likelihood), "token" (per token) or "byte" (per UTF-8 byte)."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    rows = []
    for i, item in enumerate(items):
        for key in ("question", "choices", "answer"):
            if key not in item:
                raise ValueError(f"item {i}: missing {key!r} (want question, choices, answer)")
        answer = item["answer"]
        if isinstance(answer, str):
            answer = "ABCDEFGHIJKLMNOPQRSTUVWXYZ".index(answer.strip().upper())
        scored = choice_logprobs(model, tokenizer, template.format(question=item["question"]),
                                 [" " + str(c) for c in item["choices"]], batch_size=batch_size)
        div = {"sum": lambda s: 1, "token": lambda s: s["tokens"], "byte": lambda s: s["bytes"]}[normalization]
        scores = [s["logprob"] / div(s) for s in scored]
        pick = int(np.argmax(scores))
        rows.append({"pick": pick, "answer": int(answer), "correct": pick == int(answer), "scores": scores})
    if not rows:
        raise ValueError("multiple_choice: no items")
    return {"items": len(rows), "normalization": normalization,
            "accuracy": sum(r["correct"] for r in rows) / len(rows), "per_item": rows}
