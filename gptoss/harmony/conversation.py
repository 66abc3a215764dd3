"""Harmony conversations as plain data: the JSON of openai-harmony's `Conversation.to_json()`, normalised.

A conversation is ``{"messages": [...]}`` (a dict, its JSON string, a bare list of messages, or any object with
``to_dict()`` / ``to_json()`` such as an ``openai_harmony.Conversation``). A message is
``{"role", "name", "content", "channel", "recipient", "content_type"}`` where content is a string or a list of parts:
``{"type": "text", "text"}``, ``{"type": "system_content", ...}`` or ``{"type": "developer_content", ...}``.

The builders at the bottom (`system_message`, `developer_message`, `message`, ...) make the same structures without
openai-harmony installed.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

ROLES = ("user", "assistant", "system", "developer", "tool")
DEFAULT_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
DEFAULT_KNOWLEDGE_CUTOFF = "2024-06"
DEFAULT_CHANNELS = ("analysis", "commentary", "final")
REASONING_EFFORTS = ("low", "medium", "high")


class HarmonyFormatError(ValueError):
    """A conversation that cannot be rendered (unknown role, tool without a name, misplaced system content...)."""


def role_name(role: Any) -> str:
    """'assistant' from 'assistant', 'Assistant' or openai_harmony.Role.ASSISTANT."""
    value = getattr(role, "value", role)
    if not isinstance(value, str) or value.lower() not in ROLES:
        raise HarmonyFormatError(f"unknown role {role!r} (expected one of {', '.join(ROLES)})")
    return value.lower()


@dataclasses.dataclass
class Message:
    """One harmony message. `content` holds normalised parts (dicts with a "type")."""

    role: str
    content: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    name: str | None = None
    channel: str | None = None
    recipient: str | None = None
    content_type: str | None = None

    @property
    def text(self) -> str:
        """The concatenated text parts."""
        return "".join(p["text"] for p in self.content if p.get("type") == "text")

    def to_dict(self) -> dict[str, Any]:
        """The dict form of openai-harmony's `Message.to_dict()` (None header fields left out)."""
        out: dict[str, Any] = {"role": self.role, "name": self.name, "content": [dict(p) for p in self.content]}
        for key in ("channel", "recipient", "content_type"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


def _normalize_part(part: Any, where: str) -> dict[str, Any]:
    if isinstance(part, str):
        return {"type": "text", "text": part}
    if hasattr(part, "to_dict") and not isinstance(part, Mapping):
        part = part.to_dict()
    if not isinstance(part, Mapping):
        raise HarmonyFormatError(f"{where}: content part must be a dict or a string, got {type(part).__name__}")
    kind = part.get("type")
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise HarmonyFormatError(f"{where}: text part without a string 'text'")
        return {"type": "text", "text": part["text"]}
    if kind in ("system_content", "developer_content"):
        return dict(part)
    raise HarmonyFormatError(f"{where}: unknown content part type {kind!r}")


def normalize_message(msg: Any, where: str = "message") -> Message:
    """A `Message` from a message dict (harmony JSON), a `Message`, or an object with ``to_dict()``."""
    if isinstance(msg, Message):
        return msg
    if hasattr(msg, "to_dict") and not isinstance(msg, Mapping):
        msg = msg.to_dict()
    if not isinstance(msg, Mapping):
        raise HarmonyFormatError(f"{where}: expected a dict, got {type(msg).__name__}")
    if "role" not in msg and isinstance(msg.get("author"), Mapping):  # {"author": {"role", "name"}} form
        msg = {**msg, **msg["author"]}
    role = role_name(msg.get("role"))
    raw = msg.get("content", [])
    parts = raw if isinstance(raw, list | tuple) else [raw]
    content = [_normalize_part(p, where) for p in parts]
    fields = {}
    for key in ("name", "channel", "recipient", "content_type"):
        value = msg.get(key)
        if value is not None and not isinstance(value, str):
            raise HarmonyFormatError(f"{where}: {key} must be a string, got {type(value).__name__}")
        fields[key] = value
    return Message(role=role, content=content, **fields)


def normalize_conversation(conversation: Any) -> list[Message]:
    """The messages of a conversation given as dict, JSON string, list of messages or harmony `Conversation`."""
    if isinstance(conversation, str | bytes):
        try:
            conversation = json.loads(conversation)
        except ValueError as e:
            raise HarmonyFormatError(f"conversation is not valid JSON: {e}") from None
    elif hasattr(conversation, "to_dict") and not isinstance(conversation, Mapping):
        conversation = conversation.to_dict()
    if isinstance(conversation, Mapping):
        if "messages" not in conversation:
            raise HarmonyFormatError("conversation dict has no 'messages'")
        conversation = conversation["messages"]
    if isinstance(conversation, Message):
        conversation = [conversation]
    if not isinstance(conversation, Sequence | Iterable) or isinstance(conversation, str | bytes | Mapping):
        raise HarmonyFormatError(f"cannot read a conversation from {type(conversation).__name__}")
    return [normalize_message(m, f"message {i}") for i, m in enumerate(conversation)]


def conversation_to_dict(messages: Iterable[Any]) -> dict[str, Any]:
    """``{"messages": [...]}`` in harmony's JSON shape (for `openai_harmony.Conversation.from_json` too)."""
    return {"messages": [normalize_message(m).to_dict() for m in messages]}


# ------------------------------------------------------------------------------------------------ builders


def function_tool(name: str, description: str = "", parameters: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A tool description: `parameters` is a JSON schema (rendered as a TypeScript-like type)."""
    tool: dict[str, Any] = {"name": name, "description": description}
    if parameters is not None:
        tool["parameters"] = dict(parameters)
    return tool


def tool_namespace(name: str, tools: Sequence[Mapping[str, Any]] = (), description: str | None = None) -> dict:
    ns: dict[str, Any] = {"name": name, "tools": [dict(t) for t in tools]}
    if description is not None:
        ns["description"] = description
    return ns


def system_message(
    *,
    model_identity: str | None = DEFAULT_IDENTITY,
    reasoning_effort: str | None = "medium",
    knowledge_cutoff: str | None = DEFAULT_KNOWLEDGE_CUTOFF,
    conversation_start_date: str | None = None,
    valid_channels: Sequence[str] | None = DEFAULT_CHANNELS,
    channel_required: bool = True,
    tools: Sequence[Mapping[str, Any]] = (),
) -> Message:
    """A system message with harmony's defaults; `tools` are built-in tool namespaces (`tool_namespace`)."""
    if reasoning_effort is not None and reasoning_effort.lower() not in REASONING_EFFORTS:
        raise HarmonyFormatError(f"reasoning_effort must be one of {REASONING_EFFORTS}, got {reasoning_effort!r}")
    part: dict[str, Any] = {"type": "system_content"}
    if model_identity is not None:
        part["model_identity"] = model_identity
    if reasoning_effort is not None:
        part["reasoning_effort"] = reasoning_effort.capitalize()
    if conversation_start_date is not None:
        part["conversation_start_date"] = conversation_start_date
    if knowledge_cutoff is not None:
        part["knowledge_cutoff"] = knowledge_cutoff
    if valid_channels is not None:
        part["channel_config"] = {"valid_channels": list(valid_channels), "channel_required": channel_required}
    if tools:
        part["tools"] = {ns["name"]: dict(ns) for ns in tools}
    return Message(role="system", content=[part])


def developer_message(
    instructions: str | None = None,
    *,
    function_tools: Sequence[Mapping[str, Any]] = (),
    tools: Sequence[Mapping[str, Any]] = (),
) -> Message:
    """A developer message: instructions, function tools (namespace ``functions``) and other tool namespaces."""
    part: dict[str, Any] = {"type": "developer_content"}
    if instructions is not None:
        part["instructions"] = instructions
    namespaces = {ns["name"]: dict(ns) for ns in tools}
    if function_tools:
        namespaces["functions"] = tool_namespace("functions", function_tools)
    if namespaces:
        part["tools"] = namespaces
    return Message(role="developer", content=[part])


def message(
    role: Any,
    text: str,
    *,
    name: str | None = None,
    channel: str | None = None,
    recipient: str | None = None,
    content_type: str | None = None,
) -> Message:
    """A text message (user, assistant, tool...). For a tool result, role="tool" and name="functions.get_weather"."""
    return Message(
        role=role_name(role),
        content=[{"type": "text", "text": text}],
        name=name,
        channel=channel,
        recipient=recipient,
        content_type=content_type,
    )
