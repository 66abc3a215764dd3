"""Generation: greedy parity with transformers, cache vs recompute, batching, sampling, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import gptoss
from gptoss.engine import SamplingParams, filter_logits, generate, generate_stream

NEW = 24


@pytest.fixture(scope="module")
def ours(hf_dense_ckpt):
    return gptoss.from_pretrained(hf_dense_ckpt, dtype="float32", experts="dense", progress=False)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(7)
    return [rng.integers(0, 331, n).tolist() for n in (13, 11, 16)]  # all > 2x the window of 5


def _hf_greedy(hf, prompt, n):
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                      eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _recompute_greedy(model, prompt, n, width=64):
    """Greedy by full recomputation; causal, so padding to one width (one compile) changes nothing."""
    seq = list(prompt)
    for _ in range(n):
        logits = np.asarray(model(np.array([seq + [0] * (width - len(seq))])))
        seq.append(int(np.argmax(logits[0, len(seq) - 1])))
    return seq[len(prompt):]


def test_greedy_matches_transformers_generate(ours, parity_hf, prompts):
    got = generate(ours, prompts, max_new_tokens=NEW)
    for prompt, tokens in zip(prompts, got.tokens):
        assert tokens == _hf_greedy(parity_hf, prompt, NEW)
    assert got.finished == [False] * len(prompts)


def test_cache_decode_equals_full_recompute(ours, prompts):
    got = generate(ours, prompts, max_new_tokens=NEW)
    for prompt, tokens in zip(prompts, got.tokens):
        assert tokens == _recompute_greedy(ours, prompt, NEW)


def test_greedy_does_not_depend_on_batch_composition(ours, prompts):
    alone = [generate(ours, [p], max_new_tokens=NEW).tokens[0] for p in prompts]
    together = generate(ours, prompts, max_new_tokens=NEW).tokens
    reordered = generate(ours, prompts[::-1], max_new_tokens=NEW).tokens[::-1]
    assert together == alone == reordered


def test_stream_equals_generate(ours, prompts):
    steps = list(generate_stream(ours, prompts, max_new_tokens=NEW, temperature=1.0, seed=3))
    streamed = [[s[i] for s in steps if s[i] is not None] for i in range(len(prompts))]
    assert streamed == generate(ours, prompts, max_new_tokens=NEW, temperature=1.0, seed=3).tokens


def test_stop_tokens_end_a_row(ours, prompts):
    free = generate(ours, prompts, max_new_tokens=NEW).tokens
    stop = free[0][3]
    got = generate(ours, prompts, max_new_tokens=NEW, stop_tokens=[stop])
    first = free[0].index(stop)
    assert got.tokens[0] == free[0][: first + 1] and got.finished[0]
    for row, full in zip(got.tokens[1:], free[1:]):
        assert row == (full[: full.index(stop) + 1] if stop in full else full)


def test_default_stop_tokens_are_the_configs_eos_ids(ours, prompts):
    """Without stop_tokens a row stops at any of the config's eos_token_id (gptoss.generate, the top-level name)."""
    from flax import nnx

    free = gptoss.generate(ours, prompts, max_new_tokens=NEW, stop_tokens=[]).tokens
    model = nnx.clone(ours)
    model.config = ours.config.replace(eos_token_id=(free[1][5], 330))
    got = gptoss.generate(model, prompts, max_new_tokens=NEW)
    assert got.tokens[1] == free[1][: free[1].index(free[1][5]) + 1] and got.finished[1]


def test_logprobs_are_the_model_distribution(ours, prompts):
    got = generate(ours, prompts, max_new_tokens=NEW, return_logprobs=True)
    seq = prompts[0] + got.tokens[0]
    logits = np.asarray(ours(np.array([seq + [0] * (64 - len(seq))])))[0, len(prompts[0]) - 1 : len(seq) - 1]
    ref = jax.nn.log_softmax(logits, axis=-1)[np.arange(NEW), got.tokens[0]]
    np.testing.assert_allclose(got.logprobs[0], np.asarray(ref), atol=1e-4)


def test_seeded_sampling_is_reproducible(ours, prompts):
    a = generate(ours, prompts, max_new_tokens=NEW, temperature=1.0, seed=11).tokens
    b = generate(ours, prompts, max_new_tokens=NEW, temperature=1.0, seed=11).tokens
    c = generate(ours, prompts, max_new_tokens=NEW, temperature=1.0, seed=12).tokens
    assert a == b and a != c


def _frequencies(logits, params, n=20000):
    keys = jax.random.split(jax.random.key(0), n)
    draws = jax.vmap(lambda k: jax.random.categorical(k, filter_logits(logits[None], params)[0]))(keys)
    return np.bincount(np.asarray(draws), minlength=logits.shape[-1]) / n


def test_top_k_and_top_p_distributions():
    logits = jnp.log(jnp.array([0.05, 0.4, 0.1, 0.3, 0.15]))
    # top-k=2 keeps {1: .4, 3: .3} renormalized
    freq = _frequencies(logits, SamplingParams(temperature=1.0, top_k=2))
    np.testing.assert_allclose(freq, [0, 4 / 7, 0, 3 / 7, 0], atol=0.015)
    # top-p=0.75: sorted .4, .3 (cum .7 < .75) then .15 is needed -> {1, 3, 4}
    freq = _frequencies(logits, SamplingParams(temperature=1.0, top_p=0.75))
    np.testing.assert_allclose(freq, np.array([0, 0.4, 0, 0.3, 0.15]) / 0.85, atol=0.015)
    # temperature 0.5 squares the probabilities
    freq = _frequencies(logits, SamplingParams(temperature=0.5))
    p = np.array([0.05, 0.4, 0.1, 0.3, 0.15]) ** 2
    np.testing.assert_allclose(freq, p / p.sum(), atol=0.015)


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=4, temperature=-1.0), "temperature"),
    (dict(max_new_tokens=4, top_p=0.0), "top_p"),
    (dict(max_new_tokens=4, top_k=-2), "top_k"),
    (dict(max_new_tokens=200), "context"),
])
def test_bad_arguments_are_errors(ours, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(ours, [[1, 2, 3]], **kwargs)


def test_bad_prompts_are_errors(ours):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(ours, [[1], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="token id 331 at index 2"):
        generate(ours, [[1, 2, 331]], max_new_tokens=2)
    with pytest.raises(TypeError, match="list of token-id lists"):
        generate(ours, [1, 2, 3], max_new_tokens=2)
