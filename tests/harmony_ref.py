"""openai-harmony (the reference) made to work offline: its tiktoken loader reads o200k_base.tiktoken from
TIKTOKEN_ENCODINGS_BASE, which must be set before the encoding is first loaded. We point it at a folder holding the
copy decompressed from the bpe-openai wheel (the same bytes, sha256-checked)."""

import os

_ENCODING = None


def harmony_encoding(folder):
    """The openai-harmony HarmonyGptOss encoding, loaded offline (cached for the session)."""
    global _ENCODING
    if _ENCODING is None:
        from gptoss.tokenizer import packaged_o200k_base

        path = os.path.join(os.fspath(folder), "o200k_base.tiktoken")
        with open(path, "wb") as f:
            f.write(packaged_o200k_base())
        os.environ["TIKTOKEN_ENCODINGS_BASE"] = os.fspath(folder)
        import openai_harmony

        _ENCODING = openai_harmony.load_harmony_encoding(openai_harmony.HarmonyEncodingName.HARMONY_GPT_OSS)
    return _ENCODING
