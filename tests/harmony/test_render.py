"""Our harmony renderer against openai-harmony 0.0.8 (offline), token for token."""

import json
import os

import pytest
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

from gptoss import harmony as H

WEATHER = {
    "type": "object",
    "properties": {
        "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
        "format": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
    },
    "required": ["location"],
}
NESTED = {
    "type": "object",
    "description": "Search options",
    "properties": {
        "query": {"type": "string", "description": "What to look for", "title": "Query", "examples": ["cats", "dogs"]},
        "filters": {
            "type": "object",
            "description": "Optional filters",
            "properties": {
                "after": {"type": "string", "description": "ISO date"},
                "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}, "default": ["a"]},
                "deep": {"type": "object", "properties": {"x": {"type": "integer", "default": 3}}, "required": ["x"]},
            },
            "required": ["after"],
        },
        "limit": {"type": "integer", "default": 10, "nullable": True},
        "ratio": {"type": "number", "default": 0.25},
        "exact": {"type": "boolean", "default": False},
        "target": {
            "description": "Either an id or a url",
            "oneOf": [
                {"type": "integer", "description": "numeric id"},
                {"type": "string", "default": "https://x.y"},
                {"type": "object", "properties": {"path": {"type": "string"}}, "nullable": True},
            ],
        },
        "mode": {"oneOf": [{"type": "string", "description": "fast"}, {"type": "null"}], "default": "fast"},
        "matrix": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
        "anything": {"type": "array"},
        "id": {"type": ["integer", "string"], "default": -1},
        "unicode": {"type": "string", "default": 'héllo "wörld"\n', "description": "ünïcode ☃"},
    },
    "required": ["query"],
}


def _cases(oh):
    """(name, messages) pairs built with openai_harmony's own classes."""
    M, R = oh.Message, oh.Role
    sysc = oh.SystemContent.new
    dev = oh.DeveloperContent.new
    tool = oh.ToolDescription.new
    eff = oh.ReasoningEffort

    def S(c):
        return M.from_role_and_content(R.SYSTEM, c)

    def D(c):
        return M.from_role_and_content(R.DEVELOPER, c)

    def U(t):
        return M.from_role_and_content(R.USER, t)

    def A(t, ch=None):
        m = M.from_role_and_content(R.ASSISTANT, t)
        return m.with_channel(ch) if ch else m

    def T(name, t, ch="commentary"):
        return M.from_author_and_content(oh.Author.new(R.TOOL, name), t).with_channel(ch).with_recipient("assistant")

    def call(fn, args, ch="commentary"):
        return A(args, ch).with_recipient(fn).with_content_type("<|constrain|>json")

    fn_dev = (
        dev()
        .with_instructions("Always respond in riddles")
        .with_function_tools(
            [tool("get_current_weather", "Gets the current weather in the provided location.", WEATHER)]
        )
    )
    many_tools = dev().with_function_tools(
        [
            tool("search", "Search the web.\nReturns the top results.", NESTED),
            tool("ping", "No parameters at all."),
            tool("empty_obj", "", {"type": "object", "properties": {}}),
            tool("scalar", "A bare string parameter", {"type": "string", "enum": ["x", "y"]}),
            tool("union", "Top-level union", {"oneOf": [{"type": "string"}, {"type": "number", "default": 2}]}),
        ]
    )
    custom_ns = oh.ToolNamespaceConfig(
        name="calendar", description="Calendar tools.\nUse them wisely.", tools=[tool("list_events", "List", WEATHER)]
    )
    doc_ns = oh.ToolNamespaceConfig(name="docs", description="Only a description, no tools.", tools=[])
    resp_fmt = "Answer in JSON.\n\n# Response Formats\n\n## answer\n\n// The answer\n" + json.dumps(
        {"type": "object", "properties": {"value": {"type": "string"}}}
    )
    bare_system = sysc()
    bare_system.model_identity = bare_system.knowledge_cutoff = bare_system.reasoning_effort = None
    bare_system.conversation_start_date = "2030-12-31"
    sorted_ns = dev()
    for ns_name in ("zeta", "alpha", "Beta"):
        sorted_ns = sorted_ns.with_tools(oh.ToolNamespaceConfig(name=ns_name, tools=[tool("t", "d\r\nline\n")]))
    history = [U("What is 2+2?"), A("Simple math.", "analysis"), A("4", "final"), U("And 3+3?")]
    tool_turn = [
        S(sysc()),
        D(fn_dev),
        U("Weather in SF?"),
        A("Need to call the tool.", "analysis"),
        call("functions.get_current_weather", '{"location":"San Francisco, CA"}'),
        T("functions.get_current_weather", '{"temperature": 20, "sunny": true}'),
    ]
    return [
        ("user_only", [U("What is 2 + 2?")]),
        ("system_default", [S(sysc()), U("hi")]),
        (
            "system_high_date",
            [S(sysc().with_reasoning_effort(eff.HIGH).with_conversation_start_date("2025-06-28")), U("x")],
        ),
        ("system_low_identity", [S(sysc().with_reasoning_effort(eff.LOW).with_model_identity("You are Bob.")), U("y")]),
        ("system_no_cutoff", [S(sysc().with_knowledge_cutoff("2023-01").with_reasoning_effort(eff.MEDIUM)), U("z")]),
        ("system_browser", [S(sysc().with_browser_tool()), U("search cats")]),
        ("system_python", [S(sysc().with_python_tool()), U("compute")]),
        (
            "system_both_tools_date",
            [S(sysc().with_browser_tool().with_python_tool().with_conversation_start_date("2025-01-01")), U("q")],
        ),
        (
            "system_channels_optional",
            [S(sysc().with_channel_config(oh.ChannelConfig(valid_channels=["final"], channel_required=False))), U("q")],
        ),
        ("developer_instructions", [S(sysc()), D(dev().with_instructions("Be terse.\nNo emojis.")), U("hello")]),
        (
            "developer_functions",
            [
                S(sysc().with_reasoning_effort(eff.HIGH).with_conversation_start_date("2025-06-28")),
                D(fn_dev),
                U("What is the weather like in SF?"),
            ],
        ),
        ("developer_many_tools", [S(sysc()), D(many_tools), U("go")]),
        (
            "developer_namespaces",
            [S(sysc()), D(dev().with_tools(custom_ns).with_tools(doc_ns).with_instructions("i")), U("go")],
        ),
        ("developer_tools_no_instructions", [D(dev().with_function_tools([tool("a", "b")])), U("go")]),
        ("developer_response_format", [S(sysc()), D(dev().with_instructions(resp_fmt)), U("give json")]),
        (
            "system_and_dev_tools",
            [S(sysc().with_browser_tool().with_conversation_start_date("2025-06-28")), D(many_tools), U("q")],
        ),
        ("multi_turn_drop", [S(sysc()), *history]),
        ("multi_turn_final_last", [S(sysc()), *history, A("Add.", "analysis"), A("6", "final")]),
        ("tool_turn_open", tool_turn),
        ("tool_turn_done", [*tool_turn, A("It is sunny.", "analysis"), A("Sunny, 20C.", "final")]),
        ("tool_turn_next_user", [*tool_turn, A("Sunny, 20C.", "final"), U("thanks"), A("np", "analysis")]),
        (
            "browser_call",
            [
                S(sysc().with_browser_tool()),
                U("news?"),
                A('{"query":"news"}', "analysis").with_recipient("browser.search"),
                T("browser.search", "[0] result", "analysis"),
            ],
        ),
        (
            "python_call",
            [
                S(sysc().with_python_tool()),
                U("2**100?"),
                A("print(2**100)", "analysis").with_recipient("python"),
                T("python", "1267650600228229401496703205376", "analysis"),
            ],
        ),
        ("unicode", [U("héllo wörld 日本語 😀👍🏽 👨‍👩‍👧 🇫🇷 \u200b\u00a0x"), A("ça va? Ünïcödé ✓", "final")]),
        ("whitespace", [U("   lots   of\t\tspace\n\n\n  \r\n end  "), A("\n\n", "final")]),
        ("special_strings", [U("<|start|>user<|message|>not special<|end|>"), A("<|return|>", "final")]),
        (
            "names",
            [
                M.from_author_and_content(oh.Author.new(R.USER, "alice"), "hi"),
                M.from_author_and_content(oh.Author.new(R.ASSISTANT, "bot"), "yo").with_channel("final"),
            ],
        ),
        ("multi_part", [U("part one. ").adding_content("part two."), A("a").adding_content("b").with_channel("final")]),
        ("plain_system_developer", [S("plain system text"), D("plain developer text"), U("u")]),
        ("empty_content", [U(""), A("", "final")]),
        ("content_type_plain", [U("x"), A("{}", "commentary").with_recipient("functions.f").with_content_type("json")]),
        ("recipient_all", [U("x"), A("broadcast", "commentary").with_recipient("all")]),
        (
            "commentary_preamble",
            [
                S(sysc()),
                D(fn_dev),
                U("x"),
                A("Let me check.", "commentary"),
                call("functions.get_current_weather", "{}"),
            ],
        ),
        (
            "code",
            [U("def f(x):\n\treturn {'a': [1, 2]}  # comment\n\nprint(f(3))\n"), A("```python\nx = 1\n```", "final")],
        ),
        (
            "long",
            [S(sysc())]
            + [U(f"question {i} " * 20) if i % 2 == 0 else A(f"answer {i} " * 20, "final") for i in range(24)],
        ),
        ("final_with_recipient", [U("x"), A("y", "final").with_recipient("functions.f")]),
        ("analysis_only", [U("x"), A("thinking", "analysis")]),
        ("system_sparse", [S(bare_system), U("x")]),
        ("system_content_plus_text", [S(sysc()).adding_content(" extra text"), U("x")]),
        ("developer_empty_functions", [S(sysc()), D(dev().with_function_tools([])), U("x")]),
        ("developer_sorted_namespaces", [D(sorted_ns), U("x")]),
        ("user_analysis_dropped", [U("q"), U("side note").with_channel("analysis"), A("a", "final")]),
    ]


@pytest.fixture(scope="module")
def cases(harmony_enc):
    import openai_harmony as oh

    return [(name, oh.Conversation.from_messages(msgs)) for name, msgs in _cases(oh)]


def test_case_count(cases):
    assert len(cases) >= 30


@pytest.mark.parametrize("mode", ["completion", "conversation", "training"])
def test_conversations_match_harmony(cases, harmony_enc, tok, mode):
    import openai_harmony as oh

    for name, convo in cases:
        if mode == "completion":
            ref = harmony_enc.render_conversation_for_completion(convo, oh.Role.ASSISTANT)
            ours = H.render_conversation_for_completion(convo.to_json(), "assistant", tokenizer=tok)
        elif mode == "conversation":
            ref = harmony_enc.render_conversation(convo)
            ours = H.render_conversation(convo.to_dict(), tokenizer=tok)
        else:
            ref = harmony_enc.render_conversation_for_training(convo)
            ours = H.render_conversation_for_training(convo, tokenizer=tok)
        assert ours == ref, f"{name} ({mode}):\nours {tok.decode(ours)!r}\nref  {tok.decode(ref)!r}"


def test_no_auto_drop_matches_harmony(cases, harmony_enc, tok):
    import openai_harmony as oh

    cfg = oh.RenderConversationConfig(auto_drop_analysis=False)
    for name, convo in cases:
        ref = harmony_enc.render_conversation_for_completion(convo, oh.Role.ASSISTANT, cfg)
        ours = H.render_conversation_for_completion(convo.to_json(), auto_drop_analysis=False, tokenizer=tok)
        assert ours == ref, name


def test_next_turn_roles(cases, harmony_enc, tok):
    import openai_harmony as oh

    convo = dict(cases)["tool_turn_open"]
    for role in (oh.Role.USER, oh.Role.ASSISTANT, oh.Role.SYSTEM, oh.Role.DEVELOPER):
        ref = harmony_enc.render_conversation_for_completion(convo, role)
        assert H.render_conversation_for_completion(convo.to_json(), role, tokenizer=tok) == ref
        assert H.render_conversation_for_completion(convo.to_json(), role.value, tokenizer=tok) == ref


def test_single_messages_match_harmony(cases, harmony_enc, tok):
    import openai_harmony as oh

    for _, convo in cases:
        for msg in convo.messages:
            for fn in (False, True):
                ref = harmony_enc.render(msg, oh.RenderOptions(conversation_has_function_tools=fn))
                assert H.render_message_tokens(msg.to_dict(), function_tools=fn, tokenizer=tok) == ref


def test_builders_match_harmony(harmony_enc, tok):
    import openai_harmony as oh

    ref_convo = oh.Conversation.from_messages(
        [
            oh.Message.from_role_and_content(
                oh.Role.SYSTEM,
                oh.SystemContent.new()
                .with_reasoning_effort(oh.ReasoningEffort.LOW)
                .with_conversation_start_date("2025-02-03"),
            ),
            oh.Message.from_role_and_content(
                oh.Role.DEVELOPER,
                oh.DeveloperContent.new()
                .with_instructions("hi")
                .with_function_tools([oh.ToolDescription.new("f", "d", WEATHER)]),
            ),
            oh.Message.from_role_and_content(oh.Role.USER, "q"),
            oh.Message.from_role_and_content(oh.Role.ASSISTANT, "{}")
            .with_channel("commentary")
            .with_recipient("functions.f")
            .with_content_type("<|constrain|>json"),
            oh.Message.from_author_and_content(oh.Author.new(oh.Role.TOOL, "functions.f"), "r")
            .with_channel("commentary")
            .with_recipient("assistant"),
        ]
    )
    ours = [
        H.system_message(reasoning_effort="low", conversation_start_date="2025-02-03"),
        H.developer_message("hi", function_tools=[H.function_tool("f", "d", WEATHER)]),
        H.message("user", "q"),
        H.message("assistant", "{}", channel="commentary", recipient="functions.f", content_type="<|constrain|>json"),
        H.message("tool", "r", name="functions.f", channel="commentary", recipient="assistant"),
    ]
    assert H.render_conversation_for_completion(ours, tokenizer=tok) == harmony_enc.render_conversation_for_completion(
        ref_convo, oh.Role.ASSISTANT
    )
    # our JSON loads back into openai-harmony
    again = oh.Conversation.from_json(json.dumps(H.conversation_to_dict(ours)))
    assert harmony_enc.render_conversation(again) == H.render_conversation(ours, tokenizer=tok)


def test_spans(cases, tok):
    for name, convo in cases:
        for mode in ("completion", "conversation", "training"):
            r = H.render_with_spans(convo.to_json(), mode=mode, tokenizer=tok)
            messages = H.normalize_conversation(convo.to_json())
            assert len(r.message_index) == len(r.roles) == len(r.channels) == len(r.tokens)
            pos = 0
            for span in r.spans:
                assert span.start == pos, name
                pos = span.end
                assert r.tokens[span.start] == tok.start
                if span.index < 0:
                    assert mode == "completion" and span.role == "assistant"
                    continue
                msg = messages[span.index]
                assert (span.role, span.channel, span.recipient) == (msg.role, msg.channel, msg.recipient)
                assert r.tokens[span.content_start - 1] == tok.message
                assert r.tokens[span.content_end] in (tok.end, tok.call, tok.return_)
                assert span.end == span.content_end + 1
                if msg.role not in ("system", "developer") or all(p["type"] == "text" for p in msg.content):
                    assert tok.decode(r.tokens[span.content_start : span.content_end]) == msg.text
            assert pos == len(r.tokens)
            kept = {s.index for s in r.spans if s.index >= 0}
            assert sorted(kept | set(r.dropped)) == list(range(len(messages)))
            assert all(messages[i].channel == "analysis" for i in r.dropped)


def test_dropped_analysis_reported(tok):
    convo = [
        H.message("user", "a"),
        H.message("assistant", "t", channel="analysis"),
        H.message("assistant", "b", channel="final"),
    ]
    r = H.render_with_spans(convo, tokenizer=tok)
    assert r.dropped == [1] and [s.index for s in r.spans] == [0, 2]
    r = H.render_with_spans(convo, mode="training", tokenizer=tok)
    assert r.tokens[-1] == tok.return_ and r.in_content.count(True) == len(tok.encode_ordinary("a")) + 1


def test_render_errors(tok):
    with pytest.raises(H.HarmonyFormatError, match="name"):
        H.render_conversation([{"role": "tool", "content": "x"}], tokenizer=tok)
    with pytest.raises(H.HarmonyFormatError, match="role"):
        H.render_conversation([{"role": "robot", "content": "x"}], tokenizer=tok)
    with pytest.raises(H.HarmonyFormatError, match="system content"):
        H.render_conversation([{"role": "user", "content": [{"type": "system_content"}]}], tokenizer=tok)
    with pytest.raises(H.HarmonyFormatError, match="JSON"):
        H.render_conversation("{not json", tokenizer=tok)
    with pytest.raises(ValueError, match="mode"):
        H.render_with_spans([], mode="chat", tokenizer=tok)


def test_byte_tokenizer_renders_and_parses():
    from gptoss.tokenizer import load_tokenizer

    bt = load_tokenizer("harmony_bytes")
    convo = [H.system_message(), H.message("user", "héllo"), H.message("assistant", "ok", channel="final")]
    ids = H.render_conversation_for_training(convo, tokenizer=bt)
    assert max(ids) < bt.vocab_size and ids[-1] == bt.return_
    assert bt.decode(ids).startswith("<|start|>system<|message|>You are ChatGPT")
    text = bt.decode(ids)
    k = text.rindex("<|start|>assistant")
    completion = bt.encode(text[k + len("<|start|>assistant") :], allowed_special="all")
    msgs, problems = H.parse_completion(completion, tokenizer=bt)
    assert problems == [] and msgs[0].text == "ok" and msgs[0].channel == "final"


# ------------------------------------------------------------------------------------------- schemas, fuzzed

_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
_json = st.recursive(
    _scalar, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3), max_leaves=6
)
_words = st.sampled_from(["a", "b", "id", "name", "x y", "ünï", ""])
_desc = st.one_of(st.text(max_size=20), st.sampled_from(["line1\nline2", 'with "quotes"', "tab\there", "crlf\r\nx"]))


def _schema(children):
    types = st.sampled_from(["object", "string", "integer", "number", "boolean", "array", "null", "foo"])
    common = {
        "description": _desc,
        "title": _desc,
        "default": _json,
        "nullable": st.sampled_from([True, False, "yes"]),
        "examples": st.lists(st.one_of(st.text(max_size=6), st.integers()), max_size=3),
    }
    anything = {
        **common,
        "type": st.one_of(types, st.lists(st.sampled_from(["string", "integer", "null", "object"]), max_size=3)),
        "enum": st.one_of(st.lists(st.one_of(st.text(max_size=5), st.integers()), max_size=3), st.just("e")),
        "properties": st.dictionaries(_words, children, max_size=4),
        "required": st.lists(_words, max_size=3),
        "items": children,
        "oneOf": st.lists(children, max_size=3),
    }
    obj = st.fixed_dictionaries(
        {"type": st.just("object"), "properties": st.dictionaries(_words, children, min_size=1, max_size=4)},
        optional={**common, "required": st.lists(_words, max_size=3)},
    )
    enum = st.fixed_dictionaries(
        {"type": st.just("string"), "enum": st.lists(st.text(max_size=5), min_size=1, max_size=3)}, optional=common
    )
    one_of = st.fixed_dictionaries({"oneOf": st.lists(children, min_size=1, max_size=3)}, optional=common)
    array = st.fixed_dictionaries({"type": st.just("array"), "items": children}, optional=common)
    return st.one_of(st.fixed_dictionaries({}, optional=anything), obj, obj, enum, one_of, array)


_leaf = st.fixed_dictionaries({}, optional={"type": st.sampled_from(["string", "number"]), "default": _scalar})
_schemas = st.recursive(_leaf, _schema, max_leaves=10)


@settings(
    max_examples=int(os.environ.get("GPTOSS_FUZZ_EXAMPLES", 500)),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(params=st.one_of(st.none(), _schemas), desc=_desc, name=st.sampled_from(["f", "get_it"]))
def test_random_schemas_match_harmony(harmony_enc, tok, params, desc, name):
    import openai_harmony as oh

    dev = oh.DeveloperContent.new().with_function_tools([oh.ToolDescription.new(name, desc, params)])
    msg = oh.Message.from_role_and_content(oh.Role.DEVELOPER, dev)
    try:
        ref = harmony_enc.render(msg)
    except oh.HarmonyError:  # e.g. a float that serde_json reads as out of range
        reject()
    ours = H.render_message_tokens(msg.to_dict(), tokenizer=tok)
    assert ours == ref, f"\nours {tok.decode(ours)!r}\nref  {tok.decode(ref)!r}"


def test_oneof_description_rules_match_harmony(harmony_enc, tok):
    """Property and variant descriptions under a oneOf interact (first variant hidden, repeats hidden)."""
    import itertools

    import openai_harmony as oh

    def variant(kind, desc):
        return {"type": kind} if desc is None else {"type": kind, "description": desc}

    for p, d1, d2, d3 in itertools.product([None, "A", "B", ""], repeat=4):
        prop = {"oneOf": [variant("string", d1), variant("number", d2), variant("boolean", d3)]}
        if p is not None:
            prop["description"] = p
        params = {"type": "object", "properties": {"o": prop}}
        dev = oh.DeveloperContent.new().with_function_tools([oh.ToolDescription.new("f", "d", params)])
        msg = oh.Message.from_role_and_content(oh.Role.DEVELOPER, dev)
        assert H.render_message_tokens(msg.to_dict(), tokenizer=tok) == harmony_enc.render(msg), (p, d1, d2, d3)
