"""Every Python example in the README runs as written (in order, in one namespace, in a scratch folder), on the
demo model that ships in the package: a newcomer can follow the README end to end."""

from __future__ import annotations

import os
import re

import pytest

import gptoss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python_blocks() -> list[str]:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


@pytest.mark.slow
def test_readme_python_examples_run(tmp_path, monkeypatch, capsys):
    blocks = _python_blocks()
    assert len(blocks) >= 4
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    for i, code in enumerate(blocks):
        try:
            exec(compile(code, f"README.md python block {i + 1}", "exec"), namespace)
        except Exception as e:  # name the block that failed
            raise AssertionError(f"README python block {i + 1} failed: {type(e).__name__}: {e}\n{code}") from e
    assert "final 5198" in capsys.readouterr().out   # the first example's printed answer
    assert (tmp_path / "out" / "demo-copy" / "config.json").exists()
    # the copy names its tokenizer, so it loads as it was saved
    assert gptoss.load_tokenizer(str(tmp_path / "out" / "demo-copy")).name == "harmony_bytes"
    assert (tmp_path / "out" / "tuned" / "config.json").exists()
