"""Tokenizers for the harmony chat format, built fully offline.

Two tokenizers share one interface (`encode`, `encode_ordinary`, `decode`, `decode_bytes`, the harmony special ids as
attributes):

* ``o200k_harmony``: the o200k_base BPE ranks (ids 0..199997) plus the harmony special tokens 199998..201087
  (vocabulary 201088, the embedding rows of gpt-oss). Built with tiktoken from tokenizer files in a checkpoint folder
  when there are any (a ``*.tiktoken`` ranks file or a byte-level BPE ``tokenizer.json``), else from the copy of
  ``o200k_base.tiktoken`` packaged in the ``bpe-openai`` wheel. Nothing is ever downloaded.
* ``harmony_bytes``: 256 byte tokens plus the harmony special tokens at 256.. (vocabulary 272), for small research
  models trained from scratch.

A checkpoint folder records its tokenizer in ``gptoss_tokenizer.json`` (`save_tokenizer_info`); `load_tokenizer(folder)`
honours it. This module imports neither jax nor the model code.
"""

from __future__ import annotations

import base64
import functools
import gzip
import hashlib
import importlib.util
import json
import os
import re
from collections.abc import Collection, Iterable
from typing import Any, Literal

from gptoss.config import local_folder

O200K_HARMONY = "o200k_harmony"
HARMONY_BYTES = "harmony_bytes"
INFO_FILE = "gptoss_tokenizer.json"

#: sha256 of the official o200k_base.tiktoken file.
O200K_BASE_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
O200K_N_RANKS = 199998
O200K_HARMONY_VOCAB = 201088

#: The o200k pre-tokenisation regex (seven alternatives, same as tiktoken's o200k_base).
O200K_PATTERN = "|".join(
    [
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)

#: The named harmony special tokens and their o200k_harmony ids.
HARMONY_NAMED_SPECIALS: dict[str, int] = {
    "<|startoftext|>": 199998,
    "<|endoftext|>": 199999,
    "<|return|>": 200002,
    "<|constrain|>": 200003,
    "<|channel|>": 200005,
    "<|start|>": 200006,
    "<|end|>": 200007,
    "<|message|>": 200008,
    "<|call|>": 200012,
}

# Attribute name -> special token text.
_ROLE_TOKENS = {
    "startoftext": "<|startoftext|>",
    "endoftext": "<|endoftext|>",
    "return_": "<|return|>",
    "constrain": "<|constrain|>",
    "channel": "<|channel|>",
    "start": "<|start|>",
    "end": "<|end|>",
    "message": "<|message|>",
    "call": "<|call|>",
}

BYTES_VOCAB = 272  # 256 bytes + 9 named specials + 7 reserved slots (a multiple of 16)


class TokenizerError(ValueError):
    """Tokenizer files that are missing, unreadable or not the expected vocabulary; ids outside the vocabulary."""


def o200k_harmony_special_tokens() -> dict[str, int]:
    """All 1090 specials of o200k_harmony: the named ones, the rest ``<|reserved_{id}|>`` (as openai-harmony names
    them; 200018 is ``<|reserved_200018|>``, not o200k_base's ``<|endofprompt|>``)."""
    by_id = {i: name for name, i in HARMONY_NAMED_SPECIALS.items()}
    return {by_id.get(i, f"<|reserved_{i}|>"): i for i in range(O200K_N_RANKS, O200K_HARMONY_VOCAB)}


def harmony_bytes_special_tokens() -> dict[str, int]:
    """The specials of the byte tokenizer: named harmony tokens at 256.. in o200k id order, then reserved slots."""
    named = sorted(HARMONY_NAMED_SPECIALS, key=HARMONY_NAMED_SPECIALS.__getitem__)
    out = {name: 256 + k for k, name in enumerate(named)}
    for i in range(256 + len(named), BYTES_VOCAB):
        out[f"<|reserved_{i}|>"] = i
    return out


class _HarmonySpecials:
    """Special-token plumbing shared by both tokenizers (subclasses set `name`, `vocab_size`, `special_tokens`)."""

    name: str
    vocab_size: int
    special_tokens: dict[str, int]

    def _init_specials(self) -> None:
        self._special_by_id = {i: s for s, i in self.special_tokens.items()}
        self.special_tokens_set = frozenset(self.special_tokens)
        for attr, text in _ROLE_TOKENS.items():
            setattr(self, attr, self.special_tokens[text])
        self.stop_tokens = (self.return_, self.call, self.end)
        self.stop_tokens_for_assistant_actions = (self.return_, self.call)

    # attributes set by _init_specials (declared for type checkers and readers)
    start: int
    end: int
    message: int
    channel: int
    constrain: int
    return_: int
    call: int
    endoftext: int
    startoftext: int
    stop_tokens: tuple[int, ...]
    stop_tokens_for_assistant_actions: tuple[int, ...]

    @property
    def eot_token(self) -> int:
        return self.endoftext

    def is_special(self, token: int) -> bool:
        return token in self._special_by_id

    def special_id(self, text: str) -> int:
        try:
            return self.special_tokens[text]
        except KeyError:
            raise TokenizerError(f"{text!r} is not a special token of {self.name}") from None

    def _check_ids(self, tokens: Iterable[int]) -> list[int]:
        ids = [int(t) for t in tokens]
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise TokenizerError(f"token id {bad[0]} is outside the {self.name} vocabulary (size {self.vocab_size})")
        return ids

    def _resolve_specials(self, allowed_special, disallowed_special) -> tuple[frozenset[str], frozenset[str]]:
        allowed = self.special_tokens_set if allowed_special == "all" else frozenset(allowed_special)
        unknown = allowed - self.special_tokens_set
        if unknown:
            raise TokenizerError(f"not special tokens of {self.name}: {sorted(unknown)}")
        disallowed = self.special_tokens_set - allowed if disallowed_special == "all" else frozenset(disallowed_special)
        return allowed, disallowed

    @staticmethod
    def _raise_if_disallowed(text: str, disallowed: frozenset[str]) -> None:
        if not disallowed or "<|" not in text:
            return
        for s in sorted(disallowed):
            if s in text:
                raise TokenizerError(
                    f"text contains the special token {s!r}; pass allowed_special={{{s!r}}} to encode it as a special "
                    "token, or disallowed_special=() to encode it as plain text"
                )

    def decode(self, tokens: Iterable[int], errors: str = "replace") -> str:
        return self.decode_bytes(tokens).decode("utf-8", errors=errors)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} vocab={self.vocab_size}>"


class TiktokenHarmonyTokenizer(_HarmonySpecials):
    """o200k_harmony on top of a `tiktoken.Encoding` (available as `.encoding`)."""

    def __init__(self, mergeable_ranks: dict[bytes, int], *, name: str = O200K_HARMONY, source: str = "") -> None:
        import tiktoken

        if len(mergeable_ranks) != O200K_N_RANKS or max(mergeable_ranks.values()) != O200K_N_RANKS - 1:
            raise TokenizerError(
                f"{source or 'ranks'}: expected the {O200K_N_RANKS} o200k_base ranks 0..{O200K_N_RANKS - 1}, found "
                f"{len(mergeable_ranks)} (max id {max(mergeable_ranks.values(), default=-1)})"
            )
        self.name = name
        self.source = source
        self.special_tokens = o200k_harmony_special_tokens()
        self.vocab_size = O200K_HARMONY_VOCAB
        self.encoding = tiktoken.Encoding(
            name,
            pat_str=O200K_PATTERN,
            mergeable_ranks=mergeable_ranks,
            special_tokens=self.special_tokens,
            explicit_n_vocab=O200K_HARMONY_VOCAB,
        )
        self._init_specials()

    def encode(
        self,
        text: str,
        *,
        allowed_special: Literal["all"] | Collection[str] = (),
        disallowed_special: Literal["all"] | Collection[str] = "all",
    ) -> list[int]:
        allowed, disallowed = self._resolve_specials(allowed_special, disallowed_special)
        self._raise_if_disallowed(text, disallowed)
        return self.encoding.encode(text, allowed_special=set(allowed), disallowed_special=())

    def encode_ordinary(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def decode_bytes(self, tokens: Iterable[int]) -> bytes:
        return self.encoding.decode_bytes(self._check_ids(tokens))

    def token_bytes(self, token: int) -> bytes:
        return self.encoding.decode_single_token_bytes(self._check_ids([token])[0])


class ByteHarmonyTokenizer(_HarmonySpecials):
    """UTF-8 bytes as ids 0..255, harmony specials at 256.. (`harmony_bytes_special_tokens`); vocabulary 272."""

    def __init__(self) -> None:
        self.name = HARMONY_BYTES
        self.source = ""
        self.special_tokens = harmony_bytes_special_tokens()
        self.vocab_size = BYTES_VOCAB
        self._init_specials()
        self._token_bytes = [bytes([i]) for i in range(256)] + [
            self._special_by_id[i].encode() for i in range(256, BYTES_VOCAB)
        ]

    @staticmethod
    def _utf8(text: str) -> bytes:
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: replace them, as tiktoken does
            return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode("utf-8")

    def encode_ordinary(self, text: str) -> list[int]:
        return list(self._utf8(text))

    def encode(
        self,
        text: str,
        *,
        allowed_special: Literal["all"] | Collection[str] = (),
        disallowed_special: Literal["all"] | Collection[str] = "all",
    ) -> list[int]:
        allowed, disallowed = self._resolve_specials(allowed_special, disallowed_special)
        self._raise_if_disallowed(text, disallowed)
        if not allowed:
            return self.encode_ordinary(text)
        out: list[int] = []
        pattern = "(" + "|".join(re.escape(s) for s in sorted(allowed, key=len, reverse=True)) + ")"
        for k, piece in enumerate(re.split(pattern, text)):
            if k % 2:
                out.append(self.special_tokens[piece])
            elif piece:
                out.extend(self._utf8(piece))
        return out

    def decode_bytes(self, tokens: Iterable[int]) -> bytes:
        table = self._token_bytes
        return b"".join(table[t] for t in self._check_ids(tokens))

    def token_bytes(self, token: int) -> bytes:
        return self._token_bytes[self._check_ids([token])[0]]


HarmonyTokenizer = TiktokenHarmonyTokenizer | ByteHarmonyTokenizer


# ------------------------------------------------------------------------------------------------ ranks files


def parse_tiktoken_ranks(data: bytes, source: str = "") -> dict[bytes, int]:
    """Parse a ``.tiktoken`` ranks file (lines of ``base64(token) rank``)."""
    ranks: dict[bytes, int] = {}
    try:
        for line in data.splitlines():
            if line.strip():
                tok, rank = line.split()
                ranks[base64.b64decode(tok)] = int(rank)
    except ValueError as e:
        raise TokenizerError(f"{source or 'ranks file'}: not a tiktoken ranks file ({e})") from None
    return ranks


def _gpt2_byte_decoder() -> dict[str, int]:
    """Inverse of the byte-level BPE byte->unicode table used by HF tokenizer.json files."""
    visible = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {chr(b): b for b in visible}
    extra = 0
    for b in range(256):
        if b not in visible:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def ranks_from_hf_tokenizer_json(data: bytes, source: str = "") -> dict[bytes, int]:
    """o200k ranks from a byte-level BPE ``tokenizer.json`` (ids of ordinary tokens are the ranks)."""
    try:
        obj = json.loads(data)
        vocab = obj["model"]["vocab"]
    except (ValueError, KeyError, TypeError) as e:
        raise TokenizerError(f"{source or 'tokenizer.json'}: not a BPE tokenizer.json ({e})") from None
    dec = _gpt2_byte_decoder()
    ranks: dict[bytes, int] = {}
    for tok, i in vocab.items():
        if i < O200K_N_RANKS:
            try:
                ranks[bytes(dec[c] for c in tok)] = i
            except KeyError:
                raise TokenizerError(f"{source}: token {tok!r} is not byte-level BPE") from None
    specials = o200k_harmony_special_tokens()
    for added in obj.get("added_tokens") or []:
        content, i = added.get("content"), added.get("id")
        if content in HARMONY_NAMED_SPECIALS and specials[content] != i:
            raise TokenizerError(f"{source}: {content} has id {i}, o200k_harmony has {specials[content]}")
    return ranks


@functools.lru_cache(maxsize=1)
def packaged_o200k_base() -> bytes:
    """The o200k_base.tiktoken bytes packaged (gzipped) in the bpe-openai wheel, checked against the official sha256."""
    # find_spec locates the package without importing it (bpe_openai's own import is slow and not needed)
    spec = importlib.util.find_spec("bpe_openai")
    try:
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError("package bpe_openai not installed")
        folder = next(iter(spec.submodule_search_locations))
        with open(os.path.join(folder, "data", "o200k_base.tiktoken.gz"), "rb") as f:
            gz = f.read()
    except OSError as e:
        raise TokenizerError(
            "o200k_base ranks not found: install bpe-openai (it packages o200k_base.tiktoken.gz) or pass a folder "
            f"holding o200k_base.tiktoken ({e})"
        ) from None
    data = gzip.decompress(gz)
    digest = hashlib.sha256(data).hexdigest()
    if digest != O200K_BASE_SHA256:
        raise TokenizerError(f"bpe-openai's o200k_base.tiktoken has sha256 {digest}, expected {O200K_BASE_SHA256}")
    return data


@functools.lru_cache(maxsize=8)
def _build_o200k(path: str, _stamp: tuple[int, int] | None) -> TiktokenHarmonyTokenizer:
    if not path:
        return TiktokenHarmonyTokenizer(parse_tiktoken_ranks(packaged_o200k_base()), source="bpe-openai")
    with open(path, "rb") as f:
        data = f.read()
    if path.endswith(".gz"):
        data = gzip.decompress(data)
    if os.path.basename(path) == "tokenizer.json":
        ranks = ranks_from_hf_tokenizer_json(data, path)
    else:
        ranks = parse_tiktoken_ranks(data, path)
    return TiktokenHarmonyTokenizer(ranks, source=path)


def _o200k_from(path: str | None) -> TiktokenHarmonyTokenizer:
    if path is None:
        return _build_o200k("", None)
    st = os.stat(path)
    return _build_o200k(os.path.abspath(path), (st.st_mtime_ns, st.st_size))


def _find_tokenizer_file(folder: str) -> str | None:
    """A ranks file in `folder`: o200k_base.tiktoken(.gz), else a single *.tiktoken, else tokenizer.json."""
    for name in ("o200k_base.tiktoken", "o200k_base.tiktoken.gz"):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    found = sorted(f for f in os.listdir(folder) if f.endswith((".tiktoken", ".tiktoken.gz")))
    if len(found) > 1:
        raise TokenizerError(f"{folder}: several ranks files, cannot choose: {found}")
    if found:
        return os.path.join(folder, found[0])
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
        return os.path.join(folder, "tokenizer.json")
    return None


def _by_name(name: str, folder: str | None = None) -> HarmonyTokenizer:
    if name == HARMONY_BYTES:
        return ByteHarmonyTokenizer()
    if name == O200K_HARMONY:
        return _o200k_from(_find_tokenizer_file(folder) if folder else None)
    raise TokenizerError(f"unknown tokenizer {name!r} (known: {O200K_HARMONY}, {HARMONY_BYTES})")


def load_tokenizer(source: Any = None) -> HarmonyTokenizer:
    """Load a harmony tokenizer, offline.

    `source`: None (o200k_harmony from the bpe-openai package), a tokenizer name (``"o200k_harmony"``,
    ``"harmony_bytes"``), a checkpoint folder (``"demo"``: the embedded demo model), a ``.tiktoken`` /
    ``.tiktoken.gz`` ranks file or a ``tokenizer.json``, or an already built tokenizer (returned as is). A folder's
    ``gptoss_tokenizer.json`` names its tokenizer; without it, tokenizer files in the folder give o200k_harmony,
    and a folder with neither falls back to the packaged ranks.
    """
    if source is None:
        return _by_name(O200K_HARMONY)
    if isinstance(source, _HarmonySpecials):
        return source
    if not isinstance(source, str | os.PathLike):
        raise TypeError(f"load_tokenizer: expected a name, path or tokenizer, got {type(source).__name__}")
    source = os.fspath(source)
    if source in (O200K_HARMONY, HARMONY_BYTES):
        return _by_name(source)
    source = local_folder(source) or source
    if os.path.isdir(source):
        info_path = os.path.join(source, INFO_FILE)
        if os.path.isfile(info_path):
            info = read_tokenizer_info(source)
            tok = _by_name(info["name"], source)
            want = info.get("vocab_size", tok.vocab_size)
            if want != tok.vocab_size:
                raise TokenizerError(f"{info_path}: vocab_size {want}, but {tok.name} has {tok.vocab_size}")
            return tok
        return _o200k_from(_find_tokenizer_file(source))
    if os.path.isfile(source):
        return _o200k_from(source)
    raise TokenizerError(f"no tokenizer {source!r}: neither a known name nor an existing file or folder")


def read_tokenizer_info(folder: str | os.PathLike) -> dict[str, Any]:
    path = os.path.join(os.fspath(folder), INFO_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{path}: cannot read ({e})") from None
    if not isinstance(info, dict) or not isinstance(info.get("name"), str):
        raise TokenizerError(f"{path}: expected an object with a string 'name'")
    return info


def save_tokenizer_info(tokenizer: HarmonyTokenizer | str, folder: str | os.PathLike) -> str:
    """Record which tokenizer a checkpoint uses: writes ``{folder}/gptoss_tokenizer.json``; returns its path."""
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    named = {s: i for s, i in tok.special_tokens.items() if s in HARMONY_NAMED_SPECIALS}
    info = {"name": tok.name, "vocab_size": tok.vocab_size, "special_tokens": named, "format": 1}
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(os.fspath(folder), INFO_FILE)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1)
        f.write("\n")
    return path
