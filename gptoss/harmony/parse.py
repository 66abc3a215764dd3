"""Parse sampled harmony tokens back into messages, tolerantly, and stream content deltas for chat UIs.

On well-formed output (each message ``<|start|>header<|message|>content`` closed by <|end|>, <|return|> or <|call|>,
headers made of text plus <|channel|>/<|constrain|>, content of ordinary tokens; the first ``<|start|>{role}`` already
in the prompt) the messages equal openai-harmony's ``parse_messages_from_completion_tokens``. Nothing here raises on
malformed output: what can be read is returned with a list of problems. In particular:

* tokens between messages (after a stop token, before ``<|start|>``) are skipped;
* a ``<|start|>`` inside a header restarts the header, inside content it closes the open message;
* a stop token inside a header closes a message with empty content;
* headers with an empty channel, no or an unknown role, extra words, or invalid UTF-8 are read as far as possible;
* a completion cut off inside content keeps the partial message; invalid UTF-8 becomes U+FFFD;
* ids outside the vocabulary are skipped.

When the problem list is empty, the messages are exactly what openai-harmony returns (tests/harmony fuzzes this).
"""

from __future__ import annotations

import codecs
import dataclasses
import operator
import re
from collections.abc import Iterable
from typing import Any

from gptoss.harmony.conversation import ROLES, Message, role_name

# Rust's `char::is_whitespace` (Unicode White_Space) and `u8::is_ascii_whitespace` (no vertical tab).
_WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a" + (
    "\u2028\u2029\u202f\u205f\u3000"
)
_ASCII_WS = re.compile("[ \t\n\x0c\r]+")
_CHANNEL, _CONSTRAIN = "<|channel|>", "<|constrain|>"


@dataclasses.dataclass(frozen=True)
class Header:
    role: str
    name: str | None = None
    channel: str | None = None
    recipient: str | None = None
    content_type: str | None = None


def parse_header(text: str, role: str | None) -> tuple[Header, list[str]]:
    """Read a message header (the decoded text between ``<|start|>`` and ``<|message|>``) as harmony does.
    `role`: the role already known from the prompt, or None to read it from the header. Returns the header and the
    problems that harmony would refuse."""
    problems = []
    channel = None
    at = text.find(_CHANNEL)
    if at >= 0:
        after = text[at + len(_CHANNEL) :]
        stop = next((k for k, c in enumerate(after) if c in _WHITESPACE or c == "<"), len(after))
        if stop:
            channel = after[:stop]
        else:
            problems.append("empty channel after <|channel|>")
        text = text[:at] + after[stop:]
    text = text.strip(_WHITESPACE)
    if _CONSTRAIN in text:
        text = text.replace(_CONSTRAIN, " " + _CONSTRAIN).strip(_WHITESPACE)
    parts = [p for p in _ASCII_WS.split(text) if p]
    name = None
    if role is None:
        if not parts:
            problems.append("message header has no role (read as assistant)")
            role = "assistant"
        elif parts[0] in ROLES:
            role = parts[0]
            name = parts[0] if role == "tool" else None
        else:
            first = parts.pop(0)
            role, name = "tool", first
            if len(parts) == 0 and not first.startswith("to="):
                head, sep, tail = first.partition(":")
                if sep and head in ROLES:
                    role, name = head, tail
                    problems.append(f"role with a name {first!r} (read as {head}, name {tail!r})")
                else:
                    problems.append(f"unknown role {first!r} (read as a tool named so)")
    if parts and parts[0] == role:
        parts.pop(0)
    recipient = content_type = None
    if parts:
        count, last = len(parts), parts.pop()
        if last.startswith("to="):
            recipient = last[3:]
        elif count == 1:
            recipient = last
        else:
            content_type = last
            raw = parts.pop()
            recipient = raw[3:] if raw.startswith("to=") else raw
    if parts:
        problems.append(f"unexpected words in message header: {parts}")
    return Header(role, name, channel, recipient, content_type), problems


@dataclasses.dataclass(frozen=True)
class ContentDelta:
    """New text of the message being streamed (message_index counts parsed messages from 0)."""

    message_index: int
    role: str
    channel: str | None
    recipient: str | None
    text: str


def _short(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


class StreamParser:
    """Feed sampled tokens one at a time; `feed` returns the new content text (a `ContentDelta`) or None.

    `role`: the role of the turn whose ``<|start|>{role}`` ended the prompt ("assistant"), or None when the tokens
    begin with ``<|start|>``. Parsed messages accumulate in `messages`, problems in `problems`.
    """

    def __init__(self, role: Any = "assistant", *, tokenizer=None) -> None:
        if tokenizer is None:
            from gptoss.tokenizer import load_tokenizer

            tokenizer = load_tokenizer()
        self.tokenizer = tokenizer
        tok = tokenizer
        self._stops = {tok.end: "<|end|>", tok.return_: "<|return|>", tok.call: "<|call|>"}
        self.messages: list[Message] = []
        self.problems: list[str] = []
        self.tokens: list[int] = []
        self._role = role_name(role) if role is not None else None
        self.state = "header" if self._role is not None else "expect_start"
        self._header: list[int] = []
        self._stray: list[int] = []
        self._open: Header | None = None
        self._content = bytearray()
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._finished = False

    # ---------------------------------------------------------------- state for UIs
    @property
    def current_channel(self) -> str | None:
        return self._open.channel if self._open else None

    @property
    def current_role(self) -> str | None:
        return self._open.role if self._open else (self._role if self.state == "header" else None)

    @property
    def current_recipient(self) -> str | None:
        return self._open.recipient if self._open else None

    @property
    def current_content_type(self) -> str | None:
        return self._open.content_type if self._open else None

    @property
    def current_text(self) -> str:
        return self._content.decode("utf-8", errors="replace") if self._open else ""

    # ---------------------------------------------------------------- feeding
    def _problem(self, text: str) -> None:
        self.problems.append(f"token {len(self.tokens) - 1}: {text}")

    def _flush_stray(self) -> None:
        if self._stray:
            text = self.tokenizer.decode(self._stray)
            self.problems.append(f"ignored {len(self._stray)} token(s) outside any message: {_short(text)}")
            self._stray = []

    def _delta(self, text: str) -> ContentDelta | None:
        if not text or self._open is None:
            return None
        h = self._open
        return ContentDelta(len(self.messages), h.role, h.channel, h.recipient, text)

    def _start_content(self) -> None:
        raw = self.tokenizer.decode_bytes(self._header)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("utf-8", errors="replace")
            self._problem("message header is not valid UTF-8")
        header, problems = parse_header(text, self._role)
        for p in problems:
            self._problem(p)
        self._open, self._role, self._header = header, None, []
        self._content = bytearray()
        self._decoder.reset()
        self.state = "content"

    def _close(self) -> ContentDelta | None:
        delta = self._delta(self._decoder.decode(b"", final=True))
        h = self._open
        text = self._content.decode("utf-8", errors="replace")
        self.messages.append(
            Message(h.role, [{"type": "text", "text": text}], h.name, h.channel, h.recipient, h.content_type)
        )
        self._open, self._content = None, bytearray()
        return delta

    def feed(self, token: Any) -> ContentDelta | None:
        """Process one token; returns the content text it completed, if any."""
        try:
            token = operator.index(token)
        except TypeError:
            self.tokens.append(-1)
            self._problem(f"not a token id: {token!r}")
            return None
        self.tokens.append(token)
        tok = self.tokenizer
        if not 0 <= token < tok.vocab_size:
            self._problem(f"id {token} outside the vocabulary (size {tok.vocab_size}); skipped")
            return None
        if self._finished:
            self._finished = False
        if self.state == "expect_start":
            if token == tok.start:
                self._flush_stray()
                self.state, self._header = "header", []
            else:
                self._stray.append(token)
            return None
        if self.state == "header":
            if token == tok.message:
                self._start_content()
            elif token == tok.start:
                self._problem(f"<|start|> inside the message header {_short(tok.decode(self._header))}; restarted")
                self._header, self._role = [], None
            elif token in self._stops:
                self._problem(f"{self._stops[token]} ended the message header before <|message|>")
                if self._header:
                    self._start_content()
                    self.state = "expect_start"
                    return self._close()
                self.state, self._role = "expect_start", None
            else:
                self._header.append(token)
            return None
        # content
        if token in self._stops:
            self.state = "expect_start"
            return self._close()
        if token == tok.start:
            self._problem(f"message {len(self.messages)} not closed before <|start|>")
            delta = self._close()
            self.state, self._header, self._role = "header", [], None
            return delta
        if tok.is_special(token):
            self._problem(f"special token {tok.decode([token])} inside message content (kept as text)")
        data = tok.token_bytes(token)
        self._content += data
        return self._delta(self._decoder.decode(data))

    def finish(self) -> ContentDelta | None:
        """End of the completion: closes a message cut off inside its content, reports an unfinished header."""
        if self._finished:
            return None
        self._finished = True
        self._flush_stray()
        if self.state == "content":
            self.problems.append(f"message {len(self.messages)} cut off: no <|end|>, <|return|> or <|call|>")
            self.state = "expect_start"
            return self._close()
        if self.state == "header":
            text = self.tokenizer.decode(self._header)
            what = f"inside the message header {_short(text)}" if self._header else "before any message"
            self.problems.append(f"completion ended {what}")
            self.state, self._header, self._role = "expect_start", [], None
        return None

    def feed_many(self, tokens: Iterable[Any]) -> list[ContentDelta]:
        return [d for d in map(self.feed, tokens) if d is not None]


def parse_completion(
    tokens: Iterable[Any], role: Any = "assistant", *, tokenizer=None
) -> tuple[list[Message], list[str]]:
    """Messages parsed from sampled tokens, and the problems met (empty for well-formed output). Never raises on
    malformed tokens."""
    parser = StreamParser(role, tokenizer=tokenizer)
    parser.feed_many(tokens)
    parser.finish()
    return parser.messages, parser.problems
