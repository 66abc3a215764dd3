"""Generation: greedy parity with transformers, cache vs recompute, batching, sampling, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import gptoss
from gptoss.engine import SamplingParams, filter_logits, generate, generate_stream
from gptoss.engine.sampling import greedy

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


def test_greedy_on_the_pallas_kernels_matches_transformers(hf_mxfp4_ckpt, prompts):
    """The GPU path (flash attention over prefill and the KV cache, MXFP4 gather/grouped kernels) in interpret mode:
    the same tokens as transformers' own MXFP4 model."""
    model = gptoss.from_pretrained(hf_mxfp4_ckpt[0], dtype="float32", kernels="pallas", progress=False)
    assert model.runtime().pallas_kernels
    got = generate(model, prompts, max_new_tokens=8)
    for prompt, tokens in zip(prompts, got.tokens):
        assert tokens == _hf_greedy(hf_mxfp4_ckpt[1], prompt, 8)


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


def test_decodes_only_tokens_that_are_read(ours, prompts, monkeypatch):
    """N new tokens take N - 1 decode steps (the prefill gives the first); none once every row has stopped."""
    import importlib

    gen_mod = importlib.import_module("gptoss.engine.generate")  # the module (the package exports the function)
    calls = []
    real = gen_mod._decode_step

    def counted(*args):
        jax.debug.callback(lambda: calls.append(1))
        return real(*args)

    monkeypatch.setattr(gen_mod, "_decode_step", counted)
    gen_mod._generate_jit.clear_cache()  # retrace with the counting step
    try:
        free = generate(ours, prompts, max_new_tokens=5, stop_tokens=[])
        jax.effects_barrier()
        assert len(calls) == 4 and all(len(t) == 5 for t in free.tokens)
        calls.clear()
        first = [t[0] for t in free.tokens]
        got = generate(ours, prompts, max_new_tokens=5, stop_tokens=first)
        jax.effects_barrier()
        assert calls == [] and got.tokens == [[t] for t in first] and all(got.finished)
    finally:
        gen_mod._generate_jit.clear_cache()


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
    assert got.tokens == generate(ours, prompts, max_new_tokens=NEW).tokens  # computed only when asked for
    seq = prompts[0] + got.tokens[0]
    logits = np.asarray(ours(np.array([seq + [0] * (64 - len(seq))])))[0, len(prompts[0]) - 1 : len(seq) - 1]
    ref = jax.nn.log_softmax(logits, axis=-1)[np.arange(NEW), got.tokens[0]]
    np.testing.assert_allclose(got.logprobs[0], np.asarray(ref), atol=1e-4)


def test_seeded_sampling_is_reproducible(ours, prompts):
    a = generate(ours, prompts, max_new_tokens=NEW, temperature=1.0, seed=11).tokens
    b = generate(ours, prompts, max_new_tokens=NEW, temperature=1.0, seed=11).tokens
    c = generate(ours, prompts, max_new_tokens=NEW, temperature=1.0, seed=12).tokens
    assert a == b and a != c


def test_a_sampled_row_depends_on_its_own_seed_only(ours, prompts):
    """Per-row seeds: each row samples what it samples alone with its seed, whatever else is in the batch (an int
    seed gives row b the seed seed + b)."""
    kw = dict(max_new_tokens=NEW, temperature=1.0, top_k=20, top_p=0.9)
    batch = generate(ours, prompts, seed=[5, 9, 2][: len(prompts)], **kw).tokens
    for row, s in zip(range(len(prompts)), [5, 9, 2]):
        assert generate(ours, [prompts[row]], seed=[s], **kw).tokens[0] == batch[row]
    by_int = generate(ours, prompts, seed=40, **kw).tokens
    assert generate(ours, [prompts[1]], seed=41, **kw).tokens[0] == by_int[1]
    same = generate(ours, [prompts[0]] * 3, seed=[7, 7, 8], **kw).tokens  # n samples of one prompt
    assert same[0] == same[1] and same[0] != same[2]
    with pytest.raises(ValueError, match="one integer per prompt"):
        generate(ours, prompts, seed=[1], **kw)


def _kept_reference(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """numpy: the tokens sampling may draw: the top-k by probability, then the smallest prefix of them (sorted,
    renormalised over the top-k) whose mass reaches top_p."""
    p = np.exp((logits - logits.max()) / temperature)
    p /= p.sum()
    order = np.argsort(-p)
    top = order[:top_k] if top_k else order
    q = p[top] / p[top].sum()
    n = int(np.searchsorted(np.cumsum(q), top_p - 1e-12) + 1) if top_p < 1 else len(top)
    keep = np.zeros(len(p), bool)
    keep[top[:n]] = True
    return keep


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 5, 0.6), (0.7, 12, 0.9), (1.3, 3, 0.99),
                                                       (1.0, 0, 0.5), (1.0, 8, 1.0), (0.5, 30, 0.8)])
def test_top_k_then_top_p_over_the_renormalised_top_k(temperature, top_k, top_p):
    """Combined filters keep exactly numpy's set (top-p after top-k, over the top-k mass renormalised), rows
    independent; the kept logits are the temperature-scaled ones."""
    logits = np.random.default_rng(top_k).normal(size=(4, 40)).astype(np.float32) * 2
    got = np.asarray(filter_logits(jnp.asarray(logits), SamplingParams(temperature, top_p, top_k)))
    for row, g in zip(logits, got):
        keep = _kept_reference(row.astype(np.float64), temperature, top_k, top_p)
        np.testing.assert_array_equal(np.isfinite(g), keep)
        np.testing.assert_allclose(g[keep], row[keep] / temperature, rtol=1e-6)


@pytest.mark.parametrize("V", [1, 5, 127, 128, 129, 300, 1000])
def test_greedy_is_numpys_argmax(V):
    """The blockwise greedy pick is np.argmax: the first of tied maxima (values on a coarse grid tie often), the
    first NaN, index 0 for a row of -inf, +inf wins; any V, in and across the 128-wide blocks."""
    rng = np.random.default_rng(V)
    logits = np.round(rng.normal(size=(6, V)) * 2).astype(np.float32)
    logits[1] = -np.inf
    logits[2, rng.integers(0, V, 2)] = np.nan
    logits[3, rng.integers(0, V)] = np.inf
    logits[4, rng.integers(0, V, 3)] = logits[4].max() + 1  # up to three tied maxima anywhere
    got = np.asarray(jax.jit(greedy)(jnp.asarray(logits)))
    np.testing.assert_array_equal(got, np.argmax(logits, axis=-1))
    assert got.dtype == np.int32


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


def test_progress_counts_every_new_token(ours, prompts, monkeypatch):
    """progress=True: the jitted decode loop reports each step's new tokens to a tqdm bar on the host; the tokens
    and logprobs are the same as without it."""
    import tqdm.auto

    seen = []

    class Bar:
        def __init__(self, total, **kw):
            seen.append(("total", total))
            self.n = 0

        def update(self, n):
            seen.append(("update", n))
            self.n += n

        def close(self):
            seen.append(("close", None))

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    plain = generate(ours, prompts, max_new_tokens=9, return_logprobs=True)
    shown = generate(ours, prompts, max_new_tokens=9, return_logprobs=True, progress=True)
    assert shown.tokens == plain.tokens and shown.logprobs == plain.logprobs
    assert seen[0] == ("total", 9 * len(prompts)) and seen[-1] == ("close", None)
    assert sum(n for kind, n in seen if kind == "update") == sum(len(t) for t in shown.tokens) > 0


def test_progress_callable_sees_each_step(ours, prompts):
    """progress=callable: called with the new tokens of the prefill (one per row), then of each decode step; the
    output is the same as without it (benchmarks time the steps this way)."""
    calls = []
    plain = generate(ours, prompts, max_new_tokens=6)
    shown = generate(ours, prompts, max_new_tokens=6, progress=calls.append)
    assert shown.tokens == plain.tokens
    assert calls[0] == len(prompts) and len(calls) == max(len(t) for t in shown.tokens)
    assert sum(calls) == sum(len(t) for t in shown.tokens)
