"""The tolerant harmony parser: equal to openai-harmony on well-formed completions, never raising on anything else."""

import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptoss import harmony as H

FUZZ = int(os.environ.get("GPTOSS_FUZZ_EXAMPLES", 2000))


def _ref_parse(enc, tokens, role="assistant"):
    """openai-harmony's messages as dicts, or None when it refuses the tokens."""
    import openai_harmony as oh

    try:
        msgs = enc.parse_messages_from_completion_tokens(tokens, oh.Role(role) if role else None)
    except Exception:  # HarmonyError, and anything else the reference throws on odd input
        return None
    return [json.loads(m.to_json()) for m in msgs]


def _ours(tokens, tok, role="assistant"):
    msgs, problems = H.parse_completion(tokens, role, tokenizer=tok)
    return [m.to_dict() for m in msgs], problems


def _enc(tok, text):
    return tok.encode(text, allowed_special="all")


WELL_FORMED = [
    "<|channel|>analysis<|message|>Let me think.<|end|><|start|>assistant<|channel|>final<|message|>42<|return|>",
    "<|channel|>final<|message|>Hello, world!<|return|>",
    '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"location":"SF"}<|call|>',
    ' to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>{"location":"SF"}<|call|>',
    '<|channel|>analysis to=browser.search code<|message|>{"query":"x"}<|call|>',
    "<|channel|>analysis<|message|>run it<|end|><|start|>assistant to=python<|channel|>analysis"
    "<|message|>print(1)<|call|>",
    "<|channel|>commentary<|message|>I will check.<|end|><|start|>assistant<|channel|>commentary to=functions.f"
    "<|message|>{}<|call|>",
    "<|message|>no channel at all<|end|>",
    "<|channel|>final<|message|>unicode 日本語 😀👍🏽 ça\n\n\t  spaces<|return|>",
    "<|channel|>final<|message|><|return|>",
    "<|channel|>final<|message|>x<|end|><|start|>functions.f to=assistant<|channel|>commentary<|message|>r<|end|>",
    "<|channel|>final<|message|>x<|end|><|start|>user<|message|>u<|end|>",
    "<|channel|>final<|message|>text with <|fake|> markers and <| partial<|return|>",
]


@pytest.mark.parametrize("text", WELL_FORMED)
def test_well_formed_matches_harmony(text, harmony_enc, tok):
    tokens = _enc(tok, text)
    ref = _ref_parse(harmony_enc, tokens)
    ours, problems = _ours(tokens, tok)
    assert problems == []
    assert ours == ref


def test_parsed_messages_fields(tok):
    tokens = _enc(tok, WELL_FORMED[2])
    (msg,), problems = H.parse_completion(tokens, tokenizer=tok)
    assert problems == []
    assert (msg.role, msg.channel, msg.recipient, msg.content_type) == (
        "assistant",
        "commentary",
        "functions.get_weather",
        "<|constrain|>json",
    )
    assert msg.text == '{"location":"SF"}'


def test_role_none_starts_with_start(harmony_enc, tok):
    tokens = _enc(tok, "<|start|>assistant<|channel|>final<|message|>hi<|end|><|start|>user<|message|>u<|end|>")
    ours, problems = _ours(tokens, tok, role=None)
    assert problems == [] and ours == _ref_parse(harmony_enc, tokens, role=None)


MALFORMED = {
    "missing channel value": "<|channel|><|message|>x<|end|>",
    "stray text after stop": "<|channel|>final<|message|>x<|end|>stray words",
    "stray specials after stop": "<|channel|>final<|message|>x<|return|><|endoftext|><|endoftext|>",
    "truncated header": "<|channel|>fin",
    "empty": "",
    "unknown role": "<|channel|>final<|message|>x<|end|><|start|>bogus<|message|>y<|end|>",
    "role with name": "<|channel|>final<|message|>x<|end|><|start|>assistant:bob<|message|>y<|end|>",
    "header leftovers": "<|channel|>final a b c<|message|>y<|end|>",
    "no role after start": "<|channel|>final<|message|>x<|end|><|start|><|message|>y<|end|>",
    "stop in header": "<|channel|>final<|end|>",
    "start in content": "<|channel|>analysis<|message|>think<|start|>assistant<|channel|>final<|message|>ok<|return|>",
    "start in header": "<|start|>assistant<|channel|>final<|message|>ok<|return|>",
    "special in content": "<|channel|>final<|message|>a<|channel|>b<|end|>",
    "truncated content": "<|channel|>final<|message|>partial answ",
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_never_raises(name, tok):
    tokens = _enc(tok, MALFORMED[name])
    msgs, problems = H.parse_completion(tokens, tokenizer=tok)
    assert problems, name
    assert all(isinstance(p, str) for p in problems)


def test_malformed_recoveries(tok):
    def parse(text):
        return H.parse_completion(_enc(tok, text), tokenizer=tok)

    msgs, _ = parse(MALFORMED["start in content"])
    assert [(m.channel, m.text) for m in msgs] == [("analysis", "think"), ("final", "ok")]
    msgs, _ = parse(MALFORMED["start in header"])
    assert [(m.role, m.channel, m.recipient, m.text) for m in msgs] == [("assistant", "final", None, "ok")]
    msgs, _ = parse(MALFORMED["truncated content"])
    assert [(m.channel, m.text) for m in msgs] == [("final", "partial answ")]
    msgs, _ = parse(MALFORMED["stray text after stop"])
    assert [m.text for m in msgs] == ["x"]
    msgs, _ = parse(MALFORMED["stop in header"])
    assert [(m.channel, m.text) for m in msgs] == [("final", "")]
    msgs, _ = parse(MALFORMED["role with name"])
    assert (msgs[1].role, msgs[1].name, msgs[1].text) == ("assistant", "bob", "y")
    msgs, problems = parse(MALFORMED["missing channel value"])
    assert (msgs[0].channel, msgs[0].text) == (None, "x") and "channel" in problems[0]


def test_invalid_utf8_and_bad_ids(tok):
    emoji = [tok.encoding.encode_single_token(bytes([b])) for b in "😀".encode()]
    head = _enc(tok, "<|channel|>final<|message|>a")
    msgs, problems = H.parse_completion(head + emoji[:2] + _enc(tok, "b<|end|>"), tokenizer=tok)
    assert msgs[0].text == "a\ufffdb" and problems == []
    msgs, problems = H.parse_completion(head + emoji + _enc(tok, "<|end|>"), tokenizer=tok)  # split but complete
    assert msgs[0].text == "a😀" and problems == []
    msgs, problems = H.parse_completion(
        _enc(tok, "<|channel|>fi") + emoji[:2] + _enc(tok, "<|message|>x<|end|>"), tokenizer=tok
    )
    assert msgs[0].text == "x" and any("UTF-8" in p for p in problems)
    msgs, problems = H.parse_completion(head + [-5, 201088, 10**9, "x", None] + _enc(tok, "<|end|>"), tokenizer=tok)
    assert msgs[0].text == "a" and len(problems) == 5


def test_streaming_deltas(tok):
    text = "<|channel|>analysis<|message|>Thinking 日本😀 hard<|end|>"
    text += "<|start|>assistant<|channel|>final<|message|>Done.<|return|>"
    tokens = _enc(tok, text)
    emoji = [tok.encoding.encode_single_token(bytes([b])) for b in "😀".encode()]
    k = tokens.index(tok.message) + 3
    tokens = tokens[:k] + emoji + tokens[k:]  # a character split over four byte tokens
    parser = H.StreamParser(tokenizer=tok)
    seen = {}
    for t in tokens:
        d = parser.feed(t)
        if d is not None:
            assert d.channel == parser.current_channel or d.channel == parser.messages[d.message_index].channel
            seen.setdefault((d.message_index, d.channel), []).append(d.text)
    parser.finish()
    assert parser.problems == []
    assert {k: "".join(v) for k, v in seen.items()} == {(i, m.channel): m.text for i, m in enumerate(parser.messages)}
    assert all("\ufffd" not in "".join(v) for v in seen.values())  # split characters wait for their last byte


# ------------------------------------------------------------------------------------------------ fuzzing


def token_pieces(tok):
    """Token chunks random streams are built from: specials, header words, text, lone UTF-8 bytes, bad ids."""
    specials = [tok.start, tok.end, tok.message, tok.channel, tok.constrain, tok.return_, tok.call, tok.endoftext]
    specials += [tok.startoftext, 200000, 200018, 201087]
    words = [
        "assistant",
        "user",
        "tool",
        "system",
        "developer",
        "analysis",
        "commentary",
        "final",
        " to=functions.get",
        "to=browser.search",
        "functions.x",
        " json",
        "json",
        " ",
        "  ",
        "\n",
        "\t",
        "\u00a0",
        "\x0b",
        "\x1c",
        "hello",
        " world",
        "😀",
        "日本",
        "<",
        "a<b",
        "to=",
        ":",
        "assistant:bob",
        "<|channel|>",
        " code",
        "\u3000x",
    ]
    chunks = [[s] for s in specials] + [tok.encode_ordinary(w) for w in words]
    chunks += [[tok.encoding.encode_single_token(bytes([b]))] for b in (0xF0, 0x9F, 0x98, 0x80, 0xE6, 0xC3, 0xFF)]
    return chunks


@pytest.fixture(scope="module")
def pieces(tok):
    return token_pieces(tok)


_stream = st.lists(
    st.one_of(
        st.integers(min_value=0, max_value=10**6).map(lambda i: ("piece", i)),
        st.integers(min_value=0, max_value=199997).map(lambda i: ("id", i)),
        st.sampled_from([-1, 201088, 250000]).map(lambda i: ("id", i)),
    ),
    max_size=40,
)


def _build(spec, pieces):
    out = []
    for kind, v in spec:
        out += pieces[v % len(pieces)] if kind == "piece" else [v]
    return out


@settings(max_examples=FUZZ, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=_stream, role=st.sampled_from(["assistant", "assistant", None]))
def test_fuzz_random_streams(harmony_enc, tok, pieces, spec, role):
    tokens = _build(spec, pieces)
    parser = H.StreamParser(role, tokenizer=tok)
    deltas = {}
    for t in tokens:
        d = parser.feed(t)
        if d is not None:
            deltas[d.message_index] = deltas.get(d.message_index, "") + d.text
    d = parser.finish()
    if d is not None:
        deltas[d.message_index] = deltas.get(d.message_index, "") + d.text
    msgs = parser.messages
    assert {i: m.text for i, m in enumerate(msgs) if m.text} == deltas
    if not parser.problems:  # nothing odd seen: must be exactly openai-harmony's reading
        ref = _ref_parse(harmony_enc, [t for t in tokens if 0 <= t < 201088], role)
        assert ref is not None and [m.to_dict() for m in msgs] == ref


_names = st.sampled_from(["analysis", "commentary", "final", "x_y", "c1"])
_recipients = st.sampled_from(["functions.get_weather", "browser.search", "python", "assistant", "x"])
_types = st.sampled_from(["json", "<|constrain|>json", "<|constrain|>yaml", "code"])


@st.composite
def _message(draw):
    role = draw(st.sampled_from(["assistant", "assistant", "tool", "user"]))
    return H.message(
        role,
        draw(st.text(max_size=30)),
        name="functions.f" if role == "tool" else None,
        channel=draw(st.none() | _names),
        recipient="assistant" if role == "tool" else draw(st.none() | _recipients),  # harmony needs to= on tools
        content_type=draw(st.none() | _types),
    )


@settings(max_examples=max(FUZZ // 4, 50), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(msgs=st.lists(_message(), min_size=1, max_size=4), cut=st.integers(min_value=0, max_value=400))
def test_fuzz_well_formed_completions(harmony_enc, tok, msgs, cut):
    msgs[0].role, msgs[0].name = "assistant", None
    tokens = []
    for m in msgs:
        tokens += H.render_message_tokens(m, tokenizer=tok)
    tokens = tokens[2:]  # the prompt ends with <|start|>assistant
    ref = _ref_parse(harmony_enc, tokens)
    ours, problems = _ours(tokens, tok)
    assert problems == [] and ours == ref
    assert [(m["channel"] if "channel" in m else None) for m in ours] == [m.channel for m in msgs]
    # cut anywhere: never raises, and agrees with harmony whenever no problem is reported
    ours, problems = _ours(tokens[:cut], tok)
    if not problems:
        assert ours == _ref_parse(harmony_enc, tokens[:cut])


_mutation = st.tuples(st.sampled_from(["insert", "delete", "replace"]), st.integers(0, 10**6), st.integers(0, 10**6))


@settings(max_examples=max(FUZZ // 2, 50), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    msgs=st.lists(_message(), min_size=1, max_size=3),
    mutations=st.lists(_mutation, min_size=1, max_size=3),
    role=st.sampled_from(["assistant", None]),
)
def test_fuzz_mutated_completions(harmony_enc, tok, pieces, msgs, mutations, role):
    """Well-formed completions with a few tokens inserted, deleted or replaced: never raises; when no problem is
    reported the result is harmony's."""
    msgs[0].role, msgs[0].name = "assistant", None
    tokens = []
    for m in msgs:
        tokens += H.render_message_tokens(m, tokenizer=tok)
    if role == "assistant":
        tokens = tokens[2:]
    for op, where, what in mutations:
        k = where % (len(tokens) + 1)
        if op == "insert":
            tokens[k:k] = pieces[what % len(pieces)]
        elif tokens:
            k = min(k, len(tokens) - 1)
            tokens[k : k + 1] = [] if op == "delete" else pieces[what % len(pieces)]
    ours, problems = _ours(tokens, tok, role)
    if not problems:
        assert ours == _ref_parse(harmony_enc, tokens, role)
