"""Render harmony conversations to token ids, token-for-token like openai-harmony 0.0.8.

Every piece of text is encoded on its own with `encode_ordinary` (so special-token strings inside content stay text),
in the same pieces as harmony: role, ``:name``, `` to=recipient``, channel, content type, then each content part.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from gptoss.harmony.conversation import (
    HarmonyFormatError,
    Message,
    normalize_conversation,
    normalize_message,
    role_name,
)
from gptoss.harmony.schema_ts import render_tools_section


def _default_tokenizer():
    from gptoss.tokenizer import load_tokenizer

    return load_tokenizer()


@dataclasses.dataclass(frozen=True)
class MessageSpan:
    """Where one rendered message sits: tokens[start:end]; its content is tokens[content_start:content_end] and the
    terminator (<|end|>, <|call|> or <|return|>) is tokens[content_end]. `index` is the message's position in the input
    conversation (-1 for the open ``<|start|>{role}`` header that a completion prompt ends with)."""

    index: int
    role: str
    name: str | None
    channel: str | None
    recipient: str | None
    start: int
    content_start: int
    content_end: int
    end: int


@dataclasses.dataclass
class RenderedConversation:
    """Token ids plus, per message, its span (`spans`); `dropped` lists messages left out (analysis history)."""

    tokens: list[int]
    spans: list[MessageSpan]
    dropped: list[int]

    def _per_token(self, field: str, fill: Any) -> list[Any]:
        out = [fill] * len(self.tokens)
        for span in self.spans:
            value = getattr(span, field)
            out[span.start : span.end] = [value] * (span.end - span.start)
        return out

    @property
    def message_index(self) -> list[int]:
        return self._per_token("index", -1)

    @property
    def roles(self) -> list[str | None]:
        return self._per_token("role", None)

    @property
    def channels(self) -> list[str | None]:
        return self._per_token("channel", None)

    @property
    def in_content(self) -> list[bool]:
        """True for content tokens (between <|message|> and the terminator)."""
        out = [False] * len(self.tokens)
        for span in self.spans:
            out[span.content_start : span.content_end] = [True] * (span.content_end - span.content_start)
        return out


def system_text(part: Mapping[str, Any], has_function_tools: bool) -> str:
    """The text of a ``system_content`` part."""
    top = []
    if part.get("model_identity") is not None:
        top.append(part["model_identity"])
    if part.get("knowledge_cutoff") is not None:
        top.append(f"Knowledge cutoff: {part['knowledge_cutoff']}")
    if part.get("conversation_start_date") is not None:
        top.append(f"Current date: {part['conversation_start_date']}")
    sections = ["\n".join(top)] if top else []
    effort = part.get("reasoning_effort")
    if effort is not None:
        effort = str(getattr(effort, "value", effort)).lower()
        if effort not in ("low", "medium", "high"):
            raise HarmonyFormatError(f"unknown reasoning effort {part['reasoning_effort']!r}")
        sections.append(f"Reasoning: {effort}")
    if part.get("tools"):
        sections.append(render_tools_section(part["tools"]))
    channels = part.get("channel_config") or {}
    if channels.get("valid_channels"):
        header = f"# Valid channels: {', '.join(channels['valid_channels'])}."
        if channels.get("channel_required"):
            header += " Channel must be included for every message."
        if has_function_tools:
            header += "\nCalls to these tools must go to the commentary channel: 'functions'."
        sections.append(header)
    return "\n\n".join(sections)


def developer_text(part: Mapping[str, Any]) -> str:
    """The text of a ``developer_content`` part."""
    sections = []
    if part.get("instructions") is not None:
        sections += ["# Instructions", part["instructions"]]
    if part.get("tools"):
        sections.append(render_tools_section(part["tools"]))
    return "\n\n".join(sections)


def has_function_tools(messages: list[Message]) -> bool:
    """True when a developer message defines a non-empty ``functions`` namespace (adds a line to the system text)."""
    for msg in messages:
        for part in msg.content:
            if part.get("type") == "developer_content":
                ns = (part.get("tools") or {}).get("functions")
                if ns and ns.get("tools"):
                    return True
    return False


def render_message(msg: Message, tokenizer, *, function_tools: bool = False) -> tuple[list[int], int, int]:
    """Tokens of one message, with the content start and end offsets (the terminator sits at the end offset)."""
    tok = tokenizer
    out = [tok.start]
    if msg.role == "tool":
        if msg.name is None:
            raise HarmonyFormatError("a tool message needs a name (the tool, e.g. 'functions.get_weather')")
        out += tok.encode_ordinary(msg.name)
    else:
        out += tok.encode_ordinary(msg.role)
        if msg.name is not None:
            out += tok.encode_ordinary(f":{msg.name}")
    if msg.recipient is not None and msg.recipient != "all":
        out += tok.encode_ordinary(f" to={msg.recipient}")
    if msg.channel is not None:
        out.append(tok.channel)
        out += tok.encode_ordinary(msg.channel)
    if msg.content_type is not None:
        if msg.content_type.startswith("<|constrain|>"):
            out += tok.encode_ordinary(" ")
            out.append(tok.constrain)
            out += tok.encode_ordinary(msg.content_type[len("<|constrain|>") :])
        else:
            out += tok.encode_ordinary(f" {msg.content_type}")
    out.append(tok.message)
    content_start = len(out)
    for part in msg.content:
        kind = part.get("type")
        if kind == "system_content":
            if msg.role != "system":
                raise HarmonyFormatError(f"system content may only appear in system messages, not {msg.role}")
            out += tok.encode_ordinary(system_text(part, function_tools))
        elif kind == "developer_content":
            if msg.role != "developer":
                raise HarmonyFormatError(f"developer content may only appear in developer messages, not {msg.role}")
            out += tok.encode_ordinary(developer_text(part))
        else:
            out += tok.encode_ordinary(part["text"])
    content_end = len(out)
    out.append(tok.call if msg.role == "assistant" and msg.recipient is not None else tok.end)
    return out, content_start, content_end


def _kept(messages: list[Message], auto_drop_analysis: bool) -> tuple[list[int], list[int]]:
    """Indices of messages to render and to drop. With auto_drop_analysis, when the last assistant message is on the
    final channel, analysis messages before the first final-channel message are dropped (harmony's rule)."""
    last_assistant_final = next((m.channel == "final" for m in reversed(messages) if m.role == "assistant"), False)
    first_final = next((i for i, m in enumerate(messages) if m.channel == "final"), None)
    cutoff = first_final if auto_drop_analysis and last_assistant_final and first_final is not None else 0
    keep, drop = [], []
    for i, msg in enumerate(messages):
        if i < cutoff and msg.channel == "analysis":
            drop.append(i)
        else:
            keep.append(i)
    return keep, drop


def render_with_spans(
    conversation: Any,
    *,
    mode: str = "conversation",
    next_turn_role: Any = "assistant",
    auto_drop_analysis: bool = True,
    tokenizer=None,
) -> RenderedConversation:
    """Render and say which message each token belongs to. `mode`: "conversation", "completion" (append
    ``<|start|>{next_turn_role}``) or "training" (a trailing final-channel assistant message ends with <|return|>)."""
    if mode not in ("conversation", "completion", "training"):
        raise ValueError(f"mode must be 'conversation', 'completion' or 'training', got {mode!r}")
    tok = tokenizer if tokenizer is not None else _default_tokenizer()
    messages = normalize_conversation(conversation)
    function_tools = has_function_tools(messages)
    keep, drop = _kept(messages, auto_drop_analysis)
    tokens: list[int] = []
    spans: list[MessageSpan] = []
    for i in keep:
        msg = messages[i]
        ids, c0, c1 = render_message(msg, tok, function_tools=function_tools)
        base = len(tokens)
        tokens += ids
        spans.append(
            MessageSpan(i, msg.role, msg.name, msg.channel, msg.recipient, base, base + c0, base + c1, len(tokens))
        )
    if mode == "training" and messages and tokens:
        last = messages[-1]
        if last.role == "assistant" and last.channel == "final":
            tokens[-1] = tok.return_
    if mode == "completion":
        role = role_name(next_turn_role)
        base = len(tokens)
        tokens += [tok.start, *tok.encode_ordinary(role)]
        spans.append(MessageSpan(-1, role, None, None, None, base, len(tokens), len(tokens), len(tokens)))
    return RenderedConversation(tokens, spans, drop)


def render_conversation(conversation: Any, *, auto_drop_analysis: bool = True, tokenizer=None) -> list[int]:
    """Tokens of the conversation as it stands (like openai-harmony's `render_conversation`)."""
    return render_with_spans(conversation, auto_drop_analysis=auto_drop_analysis, tokenizer=tokenizer).tokens


def render_conversation_for_completion(
    conversation: Any, next_turn_role: Any = "assistant", *, auto_drop_analysis: bool = True, tokenizer=None
) -> list[int]:
    """The prompt for sampling the next turn: the conversation then ``<|start|>{next_turn_role}``."""
    return render_with_spans(
        conversation,
        mode="completion",
        next_turn_role=next_turn_role,
        auto_drop_analysis=auto_drop_analysis,
        tokenizer=tokenizer,
    ).tokens


def render_conversation_for_training(
    conversation: Any, *, auto_drop_analysis: bool = True, tokenizer=None
) -> list[int]:
    """Training tokens: like `render_conversation`, with a trailing final answer closed by <|return|>."""
    return render_with_spans(
        conversation, mode="training", auto_drop_analysis=auto_drop_analysis, tokenizer=tokenizer
    ).tokens


def render_message_tokens(message: Any, *, function_tools: bool = False, tokenizer=None) -> list[int]:
    """One message on its own (like openai-harmony's `render`)."""
    tok = tokenizer if tokenizer is not None else _default_tokenizer()
    return render_message(normalize_message(message), tok, function_tools=function_tools)[0]
