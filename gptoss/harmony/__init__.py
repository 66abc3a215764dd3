"""The harmony chat format: our own renderer and tolerant parser, token-for-token compatible with openai-harmony 0.0.8.

Conversations are the JSON of openai-harmony's `Conversation.to_json()` (dict, string, list of messages) or built with
`system_message`, `developer_message`, `message`. Imports neither jax nor the model code.
"""

from gptoss.harmony.conversation import (
    DEFAULT_IDENTITY,
    HarmonyFormatError,
    Message,
    conversation_to_dict,
    developer_message,
    function_tool,
    message,
    normalize_conversation,
    system_message,
    tool_namespace,
)
from gptoss.harmony.parse import ContentDelta, Header, StreamParser, parse_completion, parse_header
from gptoss.harmony.render import (
    MessageSpan,
    RenderedConversation,
    developer_text,
    render_conversation,
    render_conversation_for_completion,
    render_conversation_for_training,
    render_message_tokens,
    render_with_spans,
    system_text,
)
from gptoss.harmony.schema_ts import render_tools_section, schema_to_typescript

__all__ = [
    "DEFAULT_IDENTITY",
    "ContentDelta",
    "HarmonyFormatError",
    "Header",
    "Message",
    "MessageSpan",
    "RenderedConversation",
    "StreamParser",
    "conversation_to_dict",
    "developer_message",
    "developer_text",
    "function_tool",
    "message",
    "normalize_conversation",
    "parse_completion",
    "parse_header",
    "render_conversation",
    "render_conversation_for_completion",
    "render_conversation_for_training",
    "render_message_tokens",
    "render_tools_section",
    "render_with_spans",
    "schema_to_typescript",
    "system_message",
    "system_text",
    "tool_namespace",
]
