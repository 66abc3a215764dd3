"""Offline tokenizers: o200k_harmony equal to openai-harmony's encoding, and the byte-level harmony tokenizer."""

import gzip
import json
import socket
import subprocess
import sys

import pytest
from harmony_ref import harmony_encoding
from hypothesis import given, settings
from hypothesis import strategies as st

from gptoss import tokenizer as T
from gptoss.tokenizer import ByteHarmonyTokenizer, TokenizerError, load_tokenizer, save_tokenizer_info


@pytest.fixture(scope="session")
def ref(tmp_path_factory):
    """openai-harmony's HarmonyGptOss encoding, offline (TIKTOKEN_ENCODINGS_BASE set before it loads)."""
    return harmony_encoding(tmp_path_factory.mktemp("tiktoken"))


@pytest.fixture(scope="session")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="session")
def btok():
    return load_tokenizer("harmony_bytes")


TEXTS = [
    "",
    "hello world",
    "Hello, World! How's it going? I'LL be there; they'd've said 'no'.",
    "héllo wörld — ça va? Ünïcödé naïve café",
    "日本語のテキストと中文文本，한국어 텍스트",
    "مرحبا بالعالم — שלום עולם — नमस्ते दुनिया — Привет мир",
    "emoji 😀😃😄 👍🏽👩🏾‍💻 👨‍👩‍👧‍👦 🇫🇷🇯🇵 ❤️‍🔥 🏳️‍🌈 keycap 1️⃣",
    "combining: e\u0301 a\u0308 \u0915\u094d\u0937 zero\u200bwidth\u200djoiner\ufeffbom",
    "    four spaces\n\ttab\r\nwindows\rcr\u00a0nbsp\u2003em\u3000ideographic   \n\n\n   ",
    " " * 257 + "x" + "\n" * 100 + "\t" * 33,
    "def f(x: int) -> dict[str, list[int]]:\n    return {'a': [x ** 2 for x in range(10)]}  # comment\n",
    '{"key": [1, 2.5e-3, null, true], "nested": {"s": "\\u00e9\\n"}}',
    '#include <stdio.h>\nint main(void) { printf("%d\\n", 42); return 0; }\n',
    "numbers 1234567890 3.14159 -0.001 1e10 ١٢٣ ⅫⅣ ½",
    "<|start|>user<|message|>special strings as text<|end|><|return|><|reserved_200018|>",
    "\x00\x01\x7f control \x1b[31mred\x1b[0m",
    "a" * 5000,
    "The quick brown fox jumps over the lazy dog. " * 400,
]


def test_ordinary_ids_match_harmony(tok, ref):
    for text in TEXTS:
        assert tok.encode_ordinary(text) == ref.encode(text, disallowed_special=()), text[:40]
        assert tok.decode(tok.encode_ordinary(text)) == text


def test_long_mixed_input_matches_harmony(tok, ref):
    text = "\n".join(TEXTS) * 5
    ids = tok.encode_ordinary(text)
    assert len(ids) > 20000
    assert ids == ref.encode(text, disallowed_special=())
    assert tok.decode(ids) == text


def test_special_handling_matches_harmony(tok, ref):
    text = "<|start|>assistant<|channel|>final<|message|>hi<|return|> and <|endoftext|>"
    assert tok.encode(text, allowed_special="all") == ref.encode(text, allowed_special="all")
    with pytest.raises(TokenizerError, match="special token"):
        tok.encode(text)
    assert tok.encode(text, disallowed_special=()) == tok.encode_ordinary(text)
    assert tok.encode(text, allowed_special={"<|start|>"}, disallowed_special=()) == ref.encode(
        text, allowed_special={"<|start|>"}, disallowed_special=()
    )


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=200))
def test_random_text_matches_harmony(tok, ref, text):
    ids = tok.encode_ordinary(text)
    assert ids == ref.encode(text, disallowed_special=())
    assert tok.decode(ids) == text


def test_special_ids_and_names(tok, ref):
    assert tok.name == "o200k_harmony" and tok.vocab_size == 201088 == tok.encoding.n_vocab
    assert (tok.start, tok.end, tok.message, tok.channel) == (200006, 200007, 200008, 200005)
    assert (tok.constrain, tok.return_, tok.call, tok.endoftext, tok.startoftext) == (
        200003,
        200002,
        200012,
        199999,
        199998,
    )
    assert set(tok.stop_tokens) == set(ref.stop_tokens())
    assert set(tok.stop_tokens_for_assistant_actions) == set(ref.stop_tokens_for_assistant_actions())
    ids = list(range(199998, 201088))
    assert [tok.decode([i]) for i in ids] == [ref.decode([i]) for i in ids]  # reserved names as harmony has them
    assert tok.decode([200018]) == "<|reserved_200018|>"  # not o200k_base's <|endofprompt|>
    assert len(tok.special_tokens) == 1090 and all(tok.is_special(i) for i in ids)
    assert tok.special_tokens_set <= ref.special_tokens_set
    for name, i in T.HARMONY_NAMED_SPECIALS.items():
        assert tok.encode(name, allowed_special={name}) == [i] == ref.encode(name, allowed_special={name})
    assert not tok.is_special(199997) and tok.special_id("<|call|>") == 200012
    with pytest.raises(TokenizerError):
        tok.decode([201088])
    with pytest.raises(TokenizerError):
        tok.decode([-1])


def test_never_downloads(monkeypatch, tmp_path):
    """With every socket refused and an empty tiktoken cache, the tokenizer still builds."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    T._build_o200k.cache_clear()
    T.packaged_o200k_base.cache_clear()
    tok = load_tokenizer()
    assert tok.encode_ordinary("offline") == tok.encoding.encode_ordinary("offline")
    assert list(tmp_path.iterdir()) == []


def test_modules_import_without_jax():
    code = (
        "import sys, types\n"
        "pkg = types.ModuleType('gptoss'); pkg.__path__ = ['gptoss']; sys.modules['gptoss'] = pkg\n"
        "import gptoss.tokenizer, gptoss.harmony\n"
        "bad = [m for m in sys.modules if m == 'jax' or m.startswith(('jax.', 'gptoss.model', 'gptoss.io',"
        " 'gptoss.engine', 'flax', 'numpy', 'openai_harmony'))]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=T.__file__.rsplit("/gptoss/", 1)[0])


# ------------------------------------------------------------------------------------------- sources


def _byte_to_unicode():
    return {b: c for c, b in T._gpt2_byte_decoder().items()}


def test_folder_sources(tmp_path, tok):
    data = T.packaged_o200k_base()
    text = "Checkpoint tokenizers: 日本 😀 code()\n"
    want = tok.encode_ordinary(text)

    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "o200k_base.tiktoken").write_bytes(data)
    t = load_tokenizer(plain)
    assert t.source.endswith("o200k_base.tiktoken") and t.encode_ordinary(text) == want
    assert load_tokenizer(plain / "o200k_base.tiktoken").encode_ordinary(text) == want

    gz = tmp_path / "gz"
    gz.mkdir()
    (gz / "ranks.tiktoken.gz").write_bytes(gzip.compress(data))
    assert load_tokenizer(gz).encode_ordinary(text) == want

    hf = tmp_path / "hf"
    hf.mkdir()
    table = _byte_to_unicode()
    vocab = {"".join(table[b] for b in token): rank for token, rank in T.parse_tiktoken_ranks(data).items()}
    added = [{"id": i, "content": s, "special": True} for s, i in tok.special_tokens.items()]
    (hf / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": vocab}, "added_tokens": added}))
    t = load_tokenizer(hf)
    assert t.encode_ordinary(text) == want and t.encode_ordinary(TEXTS[6]) == tok.encode_ordinary(TEXTS[6])

    empty = tmp_path / "empty"
    empty.mkdir()
    assert load_tokenizer(empty).source == "bpe-openai"
    assert load_tokenizer(tok) is tok


def test_info_file_round_trip(tmp_path, tok, btok):
    for t in (tok, btok):
        folder = tmp_path / t.name
        path = save_tokenizer_info(t, folder)
        info = json.loads(open(path).read())
        assert info["name"] == t.name and info["vocab_size"] == t.vocab_size
        assert info["special_tokens"]["<|start|>"] == t.start
        again = load_tokenizer(folder)
        assert again.name == t.name and again.encode("x<|end|>", allowed_special="all") == t.encode(
            "x<|end|>", allowed_special="all"
        )
    # the info file wins over ranks files in the folder
    folder = tmp_path / "both"
    folder.mkdir()
    (folder / "o200k_base.tiktoken").write_bytes(T.packaged_o200k_base())
    save_tokenizer_info("harmony_bytes", folder)
    assert isinstance(load_tokenizer(folder), ByteHarmonyTokenizer)


def test_source_errors(tmp_path):
    with pytest.raises(TokenizerError, match="unknown tokenizer|no tokenizer"):
        load_tokenizer("gpt2")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "gptoss_tokenizer.json").write_text(json.dumps({"name": "mystery"}))
    with pytest.raises(TokenizerError, match="unknown tokenizer"):
        load_tokenizer(bad)
    (bad / "gptoss_tokenizer.json").write_text(json.dumps({"name": "harmony_bytes", "vocab_size": 999}))
    with pytest.raises(TokenizerError, match="vocab_size"):
        load_tokenizer(bad)
    (bad / "gptoss_tokenizer.json").write_text("not json")
    with pytest.raises(TokenizerError, match="cannot read"):
        load_tokenizer(bad)
    small = tmp_path / "small.tiktoken"
    small.write_bytes(b"YQ== 0\nYg== 1\n")
    with pytest.raises(TokenizerError, match="199998"):
        load_tokenizer(small)
    garbage = tmp_path / "garbage.tiktoken"
    garbage.write_bytes(b"this is not a ranks file at all\n")
    with pytest.raises(TokenizerError, match="not a tiktoken ranks file"):
        load_tokenizer(garbage)
    with pytest.raises(TypeError):
        load_tokenizer(42)


# ------------------------------------------------------------------------------------------- bytes


def test_byte_tokenizer_interface(btok, tok):
    assert btok.name == "harmony_bytes" and btok.vocab_size == 272
    names = ["start", "end", "message", "channel", "constrain", "return_", "call", "endoftext", "startoftext"]
    ids = [getattr(btok, n) for n in names]
    assert len(set(ids)) == len(ids) and all(256 <= i < 272 for i in ids)
    for n in names:  # same special names as o200k_harmony
        assert btok.decode([getattr(btok, n)]) == tok.decode([getattr(tok, n)])
    assert btok.encode_ordinary("hé") == [104, 0xC3, 0xA9]
    assert btok.encode("a<|start|>b<|end|>", allowed_special="all") == [97, btok.start, 98, btok.end]
    assert btok.encode("<|start|>", disallowed_special=()) == list(b"<|start|>")
    with pytest.raises(TokenizerError, match="special token"):
        btok.encode("<|start|>")
    with pytest.raises(TokenizerError):
        btok.decode([272])
    assert btok.decode([0xC3]) == "\ufffd" and btok.decode_bytes([0xC3]) == b"\xc3"
    assert btok.encode_ordinary("\ud800x") == list("\ufffdx".encode())  # lone surrogate replaced, as tiktoken does


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300))
def test_byte_tokenizer_round_trips_bytes(btok, data):
    assert btok.decode_bytes(list(data)) == data
    assert btok.decode(list(data)) == data.decode("utf-8", errors="replace")


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=200), specials=st.lists(st.sampled_from(sorted(T.HARMONY_NAMED_SPECIALS)), max_size=4))
def test_byte_tokenizer_round_trips_text(btok, text, specials):
    assert btok.decode(btok.encode_ordinary(text)) == text
    joined = "".join(s + text for s in specials) + text
    ids = btok.encode(joined, allowed_special="all")
    assert btok.decode(ids) == joined
    assert sum(btok.is_special(i) for i in ids) >= len(specials)
