from gptoss import cli


def test_demo_runs(capsys):
    assert cli.main(["demo", "--tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert "reproduces the original's logits: True" in out


def test_cli_info(tmp_path, capsys):
    import jax.numpy as jnp

    from gptoss import GptOss, ModelConfig, save_pretrained

    save_pretrained(GptOss(ModelConfig.tiny(), dtype=jnp.float32), tmp_path)
    assert cli.main(["info", str(tmp_path)]) == 0
    assert "hf layout" in capsys.readouterr().out
