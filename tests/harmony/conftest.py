import pytest
from harmony_ref import harmony_encoding


@pytest.fixture(scope="session")
def harmony_enc(tmp_path_factory):
    """openai-harmony's encoding, offline (TIKTOKEN_ENCODINGS_BASE set before it loads)."""
    return harmony_encoding(tmp_path_factory.mktemp("tiktoken"))


@pytest.fixture(scope="session")
def tok():
    from gptoss.tokenizer import load_tokenizer

    return load_tokenizer()
