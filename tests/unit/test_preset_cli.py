"""`melo preset` prints the derived preset as TOML that pins exactly what the daemon would use."""

import tomllib

from daemon.cli import main
from melo_runtime.backbones import load_backbone
from melo_runtime.presets import derive_preset
from tests.checkpoints import save_checkpoint


def test_melo_preset_prints_the_derived_preset_as_toml(tmp_path, capsys):
    checkpoint = save_checkpoint("phi3", tmp_path / "phi3")
    assert main(["preset", "--backbone", str(checkpoint)]) == 0
    printed = capsys.readouterr().out
    table = tomllib.loads(printed)["melo"]
    expected = derive_preset(load_backbone(checkpoint)[0]).config
    assert table == {
        "key_module": expected.key_module,
        "target_modules": expected.target_modules,
        "rank_per_block": expected.rank_per_block,
        "r_init": expected.r_init,
        "edits_per_block": expected.edits_per_block,
        "key_source": "scope",
        "key_encoder": "minilm-l6",
        "train_chat_form": True,
    }
    assert "layout decoder: layer stack model.layers (6 layers)" in printed
    assert "scope key (minilm-l6 embedding + subject code)" in printed


def test_melo_preset_on_a_missing_path_says_why_without_a_traceback(tmp_path, capsys):
    assert main(["preset", "--backbone", str(tmp_path / "missing")]) == 2
    assert "neither a shipped backbone" in capsys.readouterr().out
