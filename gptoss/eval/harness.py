"""gptoss as an lm-evaluation-harness model (`pip install gptoss[eval]`): loglikelihood, loglikelihood_rolling and
generate_until on our jitted model, so lm-eval's task suites run on packed MXFP4 checkpoints.

lm-eval finds models in its own registry and has no plugin entry point, so the registration happens when this
module is imported: run the harness through

    python -m gptoss.eval.harness --model gptoss --model_args pretrained=PATH,dtype=bfloat16 --tasks ...

(the same arguments as `lm_eval`), or from Python `lm_eval.simple_evaluate(model=GptossLM(...), tasks=[...])`.
Requests are scored on the plain text (no harmony rendering), as lm-eval's own models do; log-likelihoods are
`gptoss.eval.token_logprobs` (contexts longer than `max_length` keep their last tokens through its windows)."""

from __future__ import annotations

import numpy as np
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from gptoss.engine import generate
from gptoss.eval.likelihood import prefix_id, token_logprobs
from gptoss.io import from_pretrained, local_folder
from gptoss.tokenizer import load_tokenizer


@register_model("gptoss")
class GptossLM(LM):
    def __init__(self, pretrained: str = "demo", dtype: str = "bfloat16", experts: str = "auto",
                 kernels: str | None = None, batch_size: int | str = 8, max_length: int | None = None,
                 max_gen_toks: int = 256, max_batch_size: int | None = None, device: str | None = None, **kwargs):
        super().__init__()
        if kwargs:
            raise ValueError(f"gptoss lm-eval model: unknown model_args {sorted(kwargs)}")
        self.model = from_pretrained(pretrained, dtype=dtype, experts=experts, kernels=kernels, progress=False)
        folder = local_folder(pretrained)
        self.tokenizer = load_tokenizer(folder if folder else None)
        self.batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)
        self.max_length = int(max_length or self.model.config.max_position_embeddings)
        self.max_gen_toks = int(max_gen_toks)
        self.prefix = prefix_id(self.tokenizer)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode_ordinary(text)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding would produce the continuation)."""
        pairs = []
        for req in requests:
            context, continuation = req.args
            ctx = self._encode(context) or [self.prefix]  # an empty context: the prefix token, as lm-eval does
            pairs.append((ctx, self._encode(continuation)))
        empty = [i for i, (_, cont) in enumerate(pairs) if not cont]
        if empty:
            raise ValueError(f"loglikelihood request {empty[0]}: the continuation has no tokens")
        lps, greedy = token_logprobs(self.model, [ctx + cont for ctx, cont in pairs], seq_len=self.max_length,
                                     batch_size=self.batch_size, with_greedy=True)
        return [(float(lp[-len(cont):].astype(np.float64).sum()), bool(g[-len(cont):].all()))
                for (_, cont), lp, g in zip(pairs, lps, greedy)]

    def loglikelihood_rolling(self, requests) -> list[float]:
        """Sum of log p over every token of the string (the first after <|endoftext|>), in windows of max_length."""
        docs = [[self.prefix, *self._encode(req.args[0])] for req in requests]
        lps = token_logprobs(self.model, docs, seq_len=self.max_length, batch_size=self.batch_size)
        return [float(lp.astype(np.float64).sum()) for lp in lps]

    def generate_until(self, requests) -> list[str]:
        """Greedy (or sampled, with do_sample / temperature) continuations cut at the first `until` string."""
        out = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        for idx in groups.values():
            kw = dict(requests[idx[0]].args[1])
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kw.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(kw.pop("temperature", 0.0)) if kw.pop("do_sample", False) else 0.0
            for b in range(0, len(idx), self.batch_size):
                chunk = idx[b:b + self.batch_size]
                prompts = [self._encode(requests[i].args[0])[-(self.max_length - max_new):] or [self.prefix]
                           for i in chunk]
                gen = generate(self.model, prompts, max_new_tokens=max_new, temperature=temperature,
                               seed=[int(i) for i in chunk], stop_tokens=[self.tokenizer.endoftext])
                for i, toks in zip(chunk, gen.tokens):
                    # text ends at <|endoftext|> or at an id the tokenizer has no text for (a padded vocabulary)
                    ends = [j for j, t in enumerate(toks) if t == self.tokenizer.endoftext or
                            t >= self.tokenizer.vocab_size]
                    text = self.tokenizer.decode(toks[:ends[0]] if ends else toks)
                    cut = min([text.find(u) for u in until if u and u in text], default=len(text))
                    out[i] = text[:cut]
        return out


def main() -> None:
    """`lm_eval` with gptoss registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
