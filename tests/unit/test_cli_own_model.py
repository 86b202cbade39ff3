"""`melo run` and `melo serve` on a backbone that cannot load say why, with no traceback."""

import pytest

from daemon.cli import main


@pytest.mark.parametrize("command", ["run", "serve"])
def test_a_missing_checkpoint_directory_is_one_clear_line(tmp_path, capsys, command):
    config = tmp_path / "melo.toml"
    config.write_text(f'backbone = "{tmp_path / "no-such-model"}"\ndata_dir = "{tmp_path / "data"}"\n'
                      "[metrics]\nenabled = false\n")
    (tmp_path / "data" / "spool" / "melo.edits").mkdir(parents=True)
    assert main([command, "--config", str(config)]) == 2
    err = capsys.readouterr().err  # one line on stderr, as every configuration or startup error
    assert "error: cannot" in err and "no-such-model" in err and "neither a shipped backbone" in err
