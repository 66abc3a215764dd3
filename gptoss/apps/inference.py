"""The inference job: prompts -> harmony-rendered conversations -> generation -> parsed channels -> results."""

from __future__ import annotations

import dataclasses
import time

from gptoss import harmony
from gptoss.apps.loading import ModelSpec, chat_defaults, load_model_and_tokenizer
from gptoss.engine import generate


@dataclasses.dataclass
class SamplingSpec:
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0


@dataclasses.dataclass
class ChatSpec:
    harmony: bool = True  # render prompts as harmony user turns; False = raw text continuation
    system: bool | None = None  # a system message first (None: the checkpoint's default, else yes)
    reasoning: str = "medium"
    instructions: str | None = None  # developer instructions
    conversation_start_date: str | None = None


@dataclasses.dataclass
class InferenceConfig:
    model: ModelSpec
    task: str = "generate"
    name: str = "inference"
    prompts: list[str] = dataclasses.field(default_factory=lambda: ["Hello!"])
    sampling: SamplingSpec = dataclasses.field(default_factory=SamplingSpec)
    chat: ChatSpec = dataclasses.field(default_factory=ChatSpec)
    output_dir: str = "runs/inference"
    progress: bool = True


def conversation_for(prompt: str, chat: ChatSpec) -> list[harmony.Message]:
    messages = []
    if chat.system is not False:
        messages.append(harmony.system_message(reasoning_effort=chat.reasoning,
                                               conversation_start_date=chat.conversation_start_date))
    if chat.instructions:
        messages.append(harmony.developer_message(chat.instructions))
    messages.append(harmony.message("user", prompt))
    return messages


def encode_prompt(prompt: str, tokenizer, chat: ChatSpec) -> list[int]:
    if chat.harmony:
        return harmony.render_conversation_for_completion(conversation_for(prompt, chat), tokenizer=tokenizer)
    return tokenizer.encode_ordinary(prompt)


def run(cfg: InferenceConfig) -> dict:
    t0 = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(cfg.model, progress=cfg.progress)
    if cfg.chat.system is None:
        cfg = dataclasses.replace(cfg, chat=dataclasses.replace(
            cfg.chat, system=chat_defaults(cfg.model).get("system_message", True)))
    load_s = time.perf_counter() - t0
    prompts = [encode_prompt(p, tokenizer, cfg.chat) for p in cfg.prompts]
    s = cfg.sampling
    stop = list(tokenizer.stop_tokens_for_assistant_actions) if cfg.chat.harmony else [tokenizer.endoftext]
    t1 = time.perf_counter()
    out = generate(model, prompts, max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                   top_k=s.top_k, seed=s.seed, stop_tokens=stop, return_logprobs=True, progress=cfg.progress)
    gen_s = time.perf_counter() - t1
    results = []
    for text, ids, new, lps, done in zip(cfg.prompts, prompts, out.tokens, out.logprobs, out.finished):
        item = {"prompt": text, "prompt_tokens": len(ids), "new_tokens": len(new), "finished": done,
                "completion": tokenizer.decode(new), "token_ids": new,
                "mean_logprob": (sum(lps) / len(lps)) if lps else None}
        if cfg.chat.harmony:
            messages, problems = harmony.parse_completion(new, "assistant", tokenizer=tokenizer)
            item["messages"] = [{"channel": m.channel, "recipient": m.recipient, "text": m.text} for m in messages]
            item["final"] = next((m.text for m in reversed(messages) if m.channel == "final"), None)
            item["problems"] = problems
        results.append(item)
    total_new = sum(len(t) for t in out.tokens)
    return {"model": model.config.to_hf(), "tokenizer": tokenizer.name, "load_seconds": load_s,
            "generate_seconds_incl_compile": gen_s, "new_tokens": total_new, "results": results}
