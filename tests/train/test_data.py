"""Training data: the SFT loss mask covers exactly the chosen assistant messages (checked as text), packed rows give
the same per-token losses as one conversation per row, batches are deterministic and resume from their state."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptoss import ModelConfig, random_model
from gptoss.tokenizer import load_tokenizer
from gptoss.train.data import Batches, Example, pack, sft_example, sft_examples, text_examples

TOK = load_tokenizer("harmony_bytes")


def _conv(q, reasoning, answer):
    return {"messages": [
        {"role": "user", "content": [{"type": "text", "text": q}]},
        {"role": "assistant", "channel": "analysis", "content": [{"type": "text", "text": reasoning}]},
        {"role": "assistant", "channel": "final", "content": [{"type": "text", "text": answer}]},
    ]}


def _trained_text(ex):
    """The text of the trained targets, runs joined by '|'."""
    runs, cur = [], []
    for t, w in zip(ex.tokens, ex.weights):
        if w:
            cur.append(int(t))
        elif cur:
            runs.append(TOK.decode(cur))
            cur = []
    if cur:
        runs.append(TOK.decode(cur))
    return "|".join(runs)


def test_loss_mask_by_channel():
    conv = _conv("What is 2 + 2?", "2 plus 2 is 4.", "4")
    final = sft_example(conv, TOK, ("final",))
    assert _trained_text(final) == "<|start|>assistant<|channel|>final<|message|>4<|return|>"
    both = sft_example(conv, TOK, ("analysis", "final"))
    # the final message's own header is the model's to write after the analysis' <|end|>
    assert _trained_text(both) == ("<|channel|>analysis<|message|>2 plus 2 is 4.<|end|>"
                                   "<|start|>assistant<|channel|>final<|message|>4<|return|>")
    assert TOK.decode(final.tokens.tolist()).startswith("<|start|>user<|message|>What is 2 + 2?<|end|>")
    answer_only = {"messages": [conv["messages"][0], conv["messages"][2]]}  # no analysis: the prompt has the header
    assert _trained_text(sft_example(answer_only, TOK)) == "<|channel|>final<|message|>4<|return|>"
    with pytest.raises(ValueError, match="loss_on"):
        sft_example(conv, TOK, ("everything",))
    with pytest.raises(ValueError, match="no assistant message"):
        sft_example({"messages": conv["messages"][:1]}, TOK)


def test_jsonl_errors_name_the_line(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps(_conv("a", "b", "c")) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"sft.jsonl:2: not JSON"):
        sft_examples(path, TOK)


def _per_token_nll(model, batch):
    x, _, _ = model.hidden_states(jnp.asarray(batch["inputs"]), jnp.asarray(batch["positions"]), None,
                                  segments_BT=None if "segments" not in batch else jnp.asarray(batch["segments"]))
    logits = jnp.einsum("btd,vd->btv", x, model.unembed_VD[...], precision=jax.lax.Precision.HIGHEST)
    logp = jax.nn.log_softmax(logits, -1)
    return np.asarray(-jnp.take_along_axis(logp, jnp.asarray(batch["targets"])[..., None], -1)[..., 0])


def test_packed_row_equals_one_conversation_per_row():
    cfg = ModelConfig.tiny(num_hidden_layers=2, vocab_size=TOK.vocab_size, sliding_window=7)
    model = random_model(cfg, kernels="xla")
    examples = [sft_example(_conv(q, r, a), TOK, ("analysis", "final")) for q, r, a in
                [("What is 12 + 30?", "2+0=2, 1+3=4", "42"), ("Hi", "greet", "Hello!"), ("7 - 5?", "7-5=2", "2")]]
    packed = pack(examples, seq_len=sum(len(e.tokens) - 1 for e in examples) + 5)
    assert packed["inputs"].shape[0] == 1 and set(np.unique(packed["segments"])) == {0, 1, 2, 3}
    together = _per_token_nll(model, packed)[0]
    at = 0
    for ex in examples:
        n = len(ex.tokens) - 1
        alone = pack([ex], seq_len=n)
        np.testing.assert_array_equal(packed["weights"][0, at:at + n], alone["weights"][0])
        np.testing.assert_allclose(together[at:at + n], _per_token_nll(model, alone)[0], rtol=2e-5, atol=2e-5)
        at += n
    # without segment ids the later conversations would see the earlier ones
    leaky = dict(packed)
    del leaky["segments"]
    assert np.abs(_per_token_nll(model, leaky)[0][:at] - together[:at]).max() > 1e-3


def test_pack_layout():
    exs = [Example(np.arange(1, n + 1, dtype=np.int32), np.ones(n, np.float32)) for n in (4, 6, 3)]
    out = pack(exs, seq_len=8)
    # 3 + 5 pairs fill a row; the next 2 start a new one: rows [3 | 5], [2]
    np.testing.assert_array_equal(out["segments"], [[1, 1, 1, 2, 2, 2, 2, 2], [1, 1, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(out["positions"][1], [0, 1, -1, -1, -1, -1, -1, -1])
    np.testing.assert_array_equal(out["inputs"][0], [1, 2, 3, 1, 2, 3, 4, 5])
    np.testing.assert_array_equal(out["targets"][0], [2, 3, 4, 2, 3, 4, 5, 6])
    assert out["weights"][1, 2:].sum() == 0


def test_pack_first_fit_fills_earlier_rows():
    exs = [Example(np.arange(1, n + 2, dtype=np.int32), np.ones(n + 1, np.float32)) for n in (5, 6, 3, 2, 1)]
    # pairs 5, 6, 3, 2, 1 in rows of 8: first fit gives [5 3], [6 2], [1]; strictly in order [5], [6], [3 2 1]
    first_fit = pack(exs, seq_len=8)
    np.testing.assert_array_equal((first_fit["segments"] > 0).sum(1), [8, 8, 1])
    np.testing.assert_array_equal(first_fit["inputs"][0], [1, 2, 3, 4, 5, 1, 2, 3])
    np.testing.assert_array_equal(first_fit["positions"][1], [0, 1, 2, 3, 4, 5, 0, 1])
    in_order = pack(exs, seq_len=8, open_rows=1)
    np.testing.assert_array_equal((in_order["segments"] > 0).sum(1), [5, 6, 6])
    np.testing.assert_array_equal(in_order["segments"][2], [1, 1, 1, 2, 2, 3, 0, 0])
    rng = np.random.default_rng(0)  # every token lands exactly once, in its example's order
    many = [Example(rng.integers(1, 99, n).astype(np.int32), np.ones(n, np.float32)) for n in rng.integers(2, 40, 200)]
    out = pack(many, seq_len=64)
    got = sorted(tuple(out["inputs"][r][out["segments"][r] == s]) for r in range(len(out["inputs"]))
                 for s in range(1, out["segments"][r].max() + 1))
    assert got == sorted(tuple(e.tokens[:-1]) for e in many)
    fill, fill_in_order = ((o["segments"] > 0).mean() for o in (out, pack(many, seq_len=64, open_rows=1)))
    assert fill > 0.9 and fill > fill_in_order + 0.05, (fill, fill_in_order)


def test_batches_are_deterministic_and_resume():
    exs = text_examples([f"document number {i} " * (i % 5 + 1) for i in range(12)], TOK, seq_len=24)
    first = Batches(exs, seq_len=32, batch_size=3, seed=4)
    seen = [next(first) for _ in range(30)]  # crosses an epoch boundary
    assert first.epoch >= 1
    again = Batches(exs, seq_len=32, batch_size=3, seed=4)
    for _ in range(5):
        next(again)
    resumed = Batches(exs, seq_len=32, batch_size=3, seed=4).restore(again.state())
    for want in seen[5:]:
        got = next(resumed)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    other = next(iter(Batches(exs, seq_len=32, batch_size=3, seed=5)))
    assert not np.array_equal(other["inputs"], seen[0]["inputs"])
