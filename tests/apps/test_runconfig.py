import dataclasses

import pytest

from gptoss.runconfig import RunConfigError, from_dict, load


@dataclasses.dataclass
class Inner:
    steps: int = 1
    rate: float = 0.1
    name: str | None = None


@dataclasses.dataclass
class Outer:
    inner: Inner = dataclasses.field(default_factory=Inner)
    tags: list[str] = dataclasses.field(default_factory=list)
    flag: bool = False


def test_nested_values_and_coercion():
    cfg = from_dict(Outer, {"inner": {"steps": 3, "rate": 1}, "tags": ["a"], "flag": True})
    assert cfg == Outer(Inner(3, 1.0), ["a"], True)


@pytest.mark.parametrize("data, match", [
    ({"inner": {"stepz": 3}}, "inner.stepz"),
    ({"flg": True}, "'flg'"),
    ({"inner": {"steps": "three"}}, "inner.steps.*int"),
    ({"inner": {"steps": True}}, "inner.steps"),
    ({"tags": "a"}, "tags.*list"),
    ({"inner": 5}, "inner.*mapping"),
])
def test_errors_name_the_key(data, match):
    with pytest.raises(RunConfigError, match=match):
        from_dict(Outer, data, where="x.yaml")


def test_overrides_and_file_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inner:\n  steps: 2\n")
    cfg = load(str(path), Outer, ["inner.rate=0.5", "tags=[x, y]", "inner.name=null"])
    assert cfg.inner == Inner(2, 0.5, None) and cfg.tags == ["x", "y"]
    with pytest.raises(RunConfigError, match="key.sub=value"):
        load(str(path), Outer, ["novalue"])
    with pytest.raises(RunConfigError, match="not found"):
        load(str(tmp_path / "missing.yaml"), Outer)
    path.write_text("inner: [unclosed\n")
    with pytest.raises(RunConfigError, match="not valid YAML"):
        load(str(path), Outer)
