"""The CLI and the config-driven runner, end to end on the random tiny preset."""

import glob
import io
import json
import os
import types

import pytest
import yaml

from gptoss import cli, runconfig
from gptoss.apps.inference import InferenceConfig
from gptoss.apps.loading import ModelSpec
from gptoss.kernels import mxfp4_cpu

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "inference", "*.yaml"))))
def test_shipped_configs_parse(path):
    cfg = runconfig.load(path, InferenceConfig)
    assert cfg.task == "generate" and cfg.prompts


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "finetune", "*.yaml"))
                                         + glob.glob(os.path.join(ROOT, "configs", "train", "*.yaml"))))
def test_shipped_training_configs_parse(path):
    from gptoss.apps.train import TrainJobConfig

    cfg = runconfig.load(path, TrainJobConfig)
    assert cfg.task == "train" and cfg.steps >= 1


def test_run_writes_resolved_config_and_results(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["run", os.path.join(ROOT, "configs/inference/tiny.yaml"), f"output_dir={out}",
                     "sampling.max_new_tokens=6", "prompts=[hi]"]) == 0
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["sampling"]["max_new_tokens"] == 6 and resolved["prompts"] == ["hi"]
    results = json.loads((out / "results.json").read_text())
    (item,) = results["results"]
    assert item["prompt"] == "hi" and 1 <= item["new_tokens"] <= 6
    assert results["tokenizer"] == "harmony_bytes" and "messages" in item
    assert "written to" in capsys.readouterr().out


def test_run_rejects_a_mistyped_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: generate\nmodel:\n  preset: tiny\nsampling:\n  max_new_tokn: 3\n")
    with pytest.raises(runconfig.RunConfigError, match=r"bad\.yaml.*sampling\.max_new_tokn"):
        runconfig.load(str(bad), InferenceConfig)
    assert cli.main(["run", str(bad)]) == 2
    assert "bad.yaml: unknown key 'sampling.max_new_tokn'" in capsys.readouterr().err
    with pytest.raises(runconfig.RunConfigError):
        cli.main(["--debug", "run", str(bad)])


def test_generate_raw(capsys):
    assert cli.main(["generate", "--model", "tiny", "--dtype", "float32", "--prompt", "abc", "--raw",
                     "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip() != ""


def test_gemv_input_from_the_command_line_and_config(capsys):
    """--gemv-input (model.gemv_input in a config) sets the CPU kernels' decode GEMV input; a bad value is refused by
    its key."""
    before = mxfp4_cpu.gemv_input()
    if before is None:
        pytest.skip("gptoss's CPU kernel library is not built here")
    try:
        assert cli.main(["generate", "--model", "tiny", "--dtype", "float32", "--prompt", "abc", "--raw",
                         "--max-new-tokens", "3", "--gemv-input", "x8"]) == 0
        assert mxfp4_cpu.gemv_input() == "x8"
    finally:
        mxfp4_cpu.set_gemv_input(before)
    with pytest.raises(ValueError, match="model.gemv_input"):
        ModelSpec(preset="tiny", gemv_input="x4")


def test_chat_streams_and_quits():
    args = types.SimpleNamespace(model="tiny", dtype="float32", experts="mxfp4",
                                 kernels=None, reasoning="low", max_new_tokens=5,
                                 temperature=0.0, top_p=1.0, top_k=0, seed=0)
    out = io.StringIO()
    assert cli.cmd_chat(args, stdin=io.StringIO("hello\nagain\n\n"), stdout=out) == 0
    assert out.getvalue().count("> ") >= 3


def test_info_on_a_missing_folder_is_one_line(capsys):
    assert cli.main(["info", "./no-such-folder"]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") <= 1 and "no-such-folder" in err and "Traceback" not in err


def test_info_is_a_table_and_version_is_printed(capsys):
    import gptoss
    from gptoss.io import DEMO_DIR

    assert cli.main(["info", DEMO_DIR]) == 0
    out = capsys.readouterr().out
    assert "MXFP4 (packed)" in out and "8 (2 per token)" in out and "sliding, full alternating" in out
    assert "ModelConfig(" not in out
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"gptoss {gptoss.__version__}"


def test_generate_shows_what_a_random_model_produced(capsys):
    """A random model's completion is not valid harmony: generate says so and shows what it produced (the raw bytes
    when nothing parsed, else the messages, headers included), escaped, not nothing."""
    assert cli.main(["generate", "--model", "tiny", "--prompt", "hi", "--max-new-tokens", "12"]) == 0
    cap = capsys.readouterr()
    assert "random, untrained model" in cap.err and "(harmony:" in cap.err
    assert cap.out.startswith("[") and not any(ord(c) < 32 and c not in "\n\t" for c in cap.out)
