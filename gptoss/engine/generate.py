"""Batched, KV-cached generation: one bucketed prefill, then a decode loop inside jit (lax.while_loop)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptoss.engine.sampling import SamplingParams, row_keys, sample, token_logprob
from gptoss.layers.kv_cache import LayerCache

MIN_BUCKET = 16
# The progress bar of the generate() call in flight: the jitted decode loop reports each step to it through a host
# callback (looked up at call time: a compiled loop outlives the bar it was first traced with).
_PROGRESS: dict = {"bar": None}


class _Report:
    """`progress` given as a callable, in the bar's place."""

    def __init__(self, fn):
        self.fn, self.n, self.total = fn, 0, 0

    def update(self, n: int) -> None:
        self.n += n
        self.fn(n)

    def close(self) -> None:
        pass


def _tick(tokens) -> None:
    bar = _PROGRESS["bar"]
    if bar is not None:
        bar.update(int(tokens))


@dataclasses.dataclass
class Generation:
    tokens: list[list[int]]  # new tokens per prompt, including the stop token when one was hit
    logprobs: list[list[float]] | None  # log p(token) under the model (before temperature/top-k/top-p)
    finished: list[bool]  # stopped on a stop token (else ran out of max_new_tokens)


def bucket(n: int) -> int:
    """Rounds lengths up to a power of two (>= 16) so the number of compiled shapes stays small."""
    return max(MIN_BUCKET, 1 << (n - 1).bit_length())


def init_cache(cfg, batch: int, length: int, dtype, layout=None) -> list[LayerCache]:
    """Empty per-layer caches; with a `gptoss.sharding.Layout`, laid out on its mesh (batch/data, kv heads/tensor)."""
    cache = [LayerCache.empty(batch, cfg.sliding_window if cfg.is_sliding(i) else length, cfg.num_key_value_heads,
                              cfg.head_dim, dtype, ring=cfg.is_sliding(i)) for i in range(cfg.num_hidden_layers)]
    return cache if layout is None else layout.constrain_cache(cache)


def prepare(model, prompts: Sequence[Sequence[int]], max_new_tokens: int):
    """Validates prompts and pads them into [B, P] tokens and positions (-1 marks padding)."""
    cfg = model.config
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not prompts:
        raise ValueError("prompts is empty: pass a list of token-id lists")
    if isinstance(prompts[0], (int, np.integer)):
        raise TypeError("prompts must be a list of token-id lists (one per row), e.g. [[1, 2, 3]]")
    lens = [len(p) for p in prompts]
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty")
        arr = np.asarray(p)
        if not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"prompt {i} holds non-integer values ({arr.dtype})")
        bad = np.flatnonzero((arr < 0) | (arr >= cfg.vocab_size))
        if bad.size:
            raise ValueError(f"prompt {i} has token id {int(arr[bad[0]])} at index {int(bad[0])}, outside the "
                             f"vocabulary [0, {cfg.vocab_size})")
        if len(p) + max_new_tokens > cfg.max_position_embeddings:
            raise ValueError(f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} that exceeds the "
                             f"model's context of {cfg.max_position_embeddings} tokens")
    P = bucket(max(lens))
    tokens = np.zeros((len(prompts), P), np.int32)
    positions = np.full((len(prompts), P), -1, np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
        positions[i, : len(p)] = np.arange(len(p))
    cache_len = min(bucket(max(lens) + max_new_tokens), max(cfg.max_position_embeddings, max(lens) + max_new_tokens))
    return tokens, positions, np.asarray(lens, np.int32), cache_len


def _prefill(model, tokens, positions, lens, cache_len):
    cache = init_cache(model.config, tokens.shape[0], cache_len, model.dtype, model.layout)
    x, _, cache = model.hidden_states(tokens, positions, cache, in_order=True)  # prepare(): right-padded rows
    last = jnp.take_along_axis(x, (lens - 1)[:, None, None], axis=1)  # [B, 1, D]
    return model.logits(last)[:, 0], cache


def _decode_step(model, tok_B, pos_B, cache):
    x, _, cache = model.hidden_states(tok_B[:, None], pos_B[:, None], cache)
    return model.logits(x)[:, 0], cache


@functools.partial(jax.jit, static_argnums=(0, 5, 6, 11, 12))
def _generate_jit(graphdef, state, tokens, positions, lens, cache_len, buffer, max_new, params, stop_arr, seeds,
                  progress=False, logprobs=False):
    """`buffer` (static) bounds the output; max_new, sampling parameters, stop ids and seed are traced,
    so changing them does not recompile. `progress` (static) reports each step's new tokens to the host;
    `logprobs` (static) computes each token's log-probability (else zeros)."""
    model = nnx.merge(graphdef, state)
    B = tokens.shape[0]
    logits, cache = _prefill(model, tokens, positions, lens, cache_len)

    def pick(logits, step):
        tok = sample(logits, row_keys(seeds, step), params)
        return tok, token_logprob(logits, tok) if logprobs else jnp.zeros(tok.shape, jnp.float32)

    tok, lp = pick(logits, 0)
    out = jnp.zeros((B, buffer), jnp.int32).at[:, 0].set(tok)
    out_lp = jnp.zeros((B, buffer), jnp.float32).at[:, 0].set(lp)
    n_out = jnp.ones((B,), jnp.int32)
    done = jnp.isin(tok, stop_arr)
    if progress:
        jax.debug.callback(_tick, jnp.int32(B))

    # Step s decodes token s - 1 and picks token s: no decode runs for a token nobody reads (the last one, or
    # after every row stopped); a step of the 20b model is ~0.2 s on 2 CPU cores.
    def cond(s):
        step, _, _, done, *_ = s
        return (step < max_new) & ~jnp.all(done)

    def body(s):
        step, tok, cache, done, n_out, out, out_lp = s
        # The barrier ties the weights to the loop step: otherwise XLA:CPU hoists the bf16->f32 converts of
        # every weight out of the loop (loop-invariant code motion) and holds an f32 copy of the whole model.
        step_state, _ = jax.lax.optimization_barrier((state, step))
        logits, cache = _decode_step(nnx.merge(graphdef, step_state), tok, lens + step - 1, cache)
        tok, lp = pick(logits, step)
        live = ~done
        out = out.at[:, step].set(jnp.where(live, tok, 0))
        out_lp = out_lp.at[:, step].set(jnp.where(live, lp, 0.0))
        n_out = n_out + live
        if progress:
            jax.debug.callback(_tick, jnp.sum(live))
        done = done | jnp.isin(tok, stop_arr)
        return step + 1, tok, cache, done, n_out, out, out_lp

    state0 = (jnp.int32(1), tok, cache, done, n_out, out, out_lp)
    _, _, _, done, n_out, out, out_lp = jax.lax.while_loop(cond, body, state0)
    return _for_every_host(model, (out, out_lp, n_out, done))


def _for_every_host(model, tree):
    """A sharded model's (small) outputs replicated, so that every process can read them."""
    return tree if model.layout is None else model.layout.replicate(tree)


def row_seeds(seed: int | Sequence[int], rows: int) -> np.ndarray:
    """uint32 [rows]: `seed` + row index for an int, else one seed per row."""
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        return (np.uint64(seed) + np.arange(rows, dtype=np.uint64)).astype(np.uint32)
    seeds = np.asarray(seed)
    if seeds.shape != (rows,) or not np.issubdtype(seeds.dtype, np.integer):
        raise ValueError(f"seed must be an int or one integer per prompt ({rows}), got {seed!r}")
    return seeds.astype(np.uint32)


def generate(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, seed: int | Sequence[int] = 0,
             stop_tokens: Sequence[int] | None = None,
             return_logprobs: bool = False, progress: bool | Callable[[int], None] = False) -> Generation:
    """Continues each prompt (a list of token ids; lengths may differ) by up to `max_new_tokens` tokens.

    Greedy when temperature is 0. Stops a row at any of `stop_tokens` (default: the model config's eos_token_id,
    e.g. harmony's <|return|>, <|endoftext|> and <|call|> for gpt-oss). Rows are independent: padding never leaks
    into other rows, and a sampled row depends only on its prompt and its seed (`seed`: an int, row b then uses
    seed + b, or one seed per row, e.g. n samples of one prompt for pass@k). `progress`: a tqdm bar of new tokens
    and tokens/s on stderr, shown once a call takes more than a second, or a callable given the number of new
    tokens as each step (the prefill's first token included) finishes, e.g. to time the steps (one model on one
    device; a sharded model generates without it).
    """
    params = SamplingParams(float(temperature), float(top_p), int(top_k))
    tokens, positions, lens, cache_len = prepare(model, prompts, max_new_tokens)
    stop = [int(t) for t in (model.config.stop_token_ids if stop_tokens is None else stop_tokens)]
    stop_arr = np.full(bucket(len(stop) + 1), -1, np.int32)  # padded with -1, which no token equals
    stop_arr[: len(stop)] = stop
    graphdef, state = nnx.split(model)
    report = progress if callable(progress) else None
    progress = bool(progress) and model.layout is None
    if progress:
        from tqdm.auto import tqdm

        _PROGRESS["bar"] = _Report(report) if report else tqdm(total=len(prompts) * max_new_tokens, unit="tok",
                                                                 desc="generating", delay=1.0)
    try:
        out, out_lp, n_out, done = _generate_jit(graphdef, state, tokens, positions, lens, cache_len,
                                                 bucket(max_new_tokens), jnp.int32(max_new_tokens), params.arrays(),
                                                 stop_arr, row_seeds(seed, len(prompts)), progress,
                                                 bool(return_logprobs))
        out, out_lp, n_out, done = (np.asarray(a) for a in (out, out_lp, n_out, done))
    finally:
        if progress:
            jax.effects_barrier()  # every step's report has arrived
            bar = _PROGRESS["bar"]
            bar.total = bar.n  # rows that stopped early: the bar ends full
            bar.close()
            _PROGRESS["bar"] = None
    toks = [out[i, : n_out[i]].tolist() for i in range(len(prompts))]
    lps = [out_lp[i, : n_out[i]].tolist() for i in range(len(prompts))] if return_logprobs else None
    return Generation(toks, lps, done.tolist())


@functools.partial(jax.jit, static_argnums=(0, 5))
def _prefill_jit(graphdef, state, tokens, positions, lens, cache_len):
    model = nnx.merge(graphdef, state)
    logits, cache = _prefill(model, tokens, positions, lens, cache_len)
    return _for_every_host(model, logits), cache


_sample_jit = jax.jit(sample)


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(4,))
def _step_jit(graphdef, state, tok, pos, cache):
    model = nnx.merge(graphdef, state)
    logits, cache = _decode_step(model, tok, pos, cache)
    return _for_every_host(model, logits), cache


def generate_stream(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 0.0,
                    top_p: float = 1.0, top_k: int = 0, seed: int | Sequence[int] = 0,
                    stop_tokens: Sequence[int] | None = None) -> Iterator[list[int | None]]:
    """Yields, step by step, one new token per prompt (None once that row has stopped): for UIs and CLIs.

    Same tokens as `generate` (same sampling keys); each step is a jitted decode with the cache donated.
    """
    params = SamplingParams(float(temperature), float(top_p), int(top_k))
    tokens, positions, lens, cache_len = prepare(model, prompts, max_new_tokens)
    stop = set(model.config.stop_token_ids if stop_tokens is None else stop_tokens)
    graphdef, state = nnx.split(model)
    seeds = row_seeds(seed, len(prompts))
    logits, cache = _prefill_jit(graphdef, state, tokens, positions, lens, cache_len)
    done = np.zeros(len(prompts), bool)
    for step in range(max_new_tokens):
        tok = np.asarray(_sample_jit(logits, row_keys(seeds, step), params.arrays()))
        yield [None if d else int(t) for t, d in zip(tok, done)]
        done |= np.isin(tok, list(stop))
        if done.all() or step + 1 == max_new_tokens:
            return
        logits, cache = _step_jit(graphdef, state, jnp.asarray(tok), jnp.asarray(lens + step), cache)
