"""`melo eval` hands every word after it to the quality evaluation's own parser (melo_eval/cli.py)."""

from __future__ import annotations

import pytest

from daemon.cli import main as melo


def test_melo_eval_passes_every_following_word_to_the_benchmark_parser(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        melo(["eval", "--help"])
    assert exit_info.value.code == 0
    assert "usage: melo eval" in capsys.readouterr().out


def test_melo_eval_rejects_an_unknown_benchmark_option_in_the_benchmark_parser(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        melo(["-v", "eval", "--no-such-option"])
    assert exit_info.value.code == 2
    assert "melo eval: error: unrecognized arguments: --no-such-option" in capsys.readouterr().err
