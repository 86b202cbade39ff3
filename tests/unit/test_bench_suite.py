"""bench.suite: every run it lists is a command its benchmark accepts."""

import importlib
from pathlib import Path

import pytest

from bench import suite


@pytest.mark.parametrize("run", suite.RUNS, ids=lambda r: r.name)
def test_every_run_parses_with_its_benchmark(run, tmp_path):
    module = importlib.import_module(run.module)
    args = module.parse_args([*run.args, "--out", str(tmp_path / run.name)])
    assert str(args.out) == str(tmp_path / run.name)


def test_names_are_unique_and_prefixes_select(capsys):
    names = [r.name for r in suite.RUNS]
    assert len(names) == len(set(names))
    assert {r.name for r in suite.select("quality-scotus")} == {
        "quality-scotus-melo", "quality-scotus-melo-paper", "quality-scotus-grace", "quality-scotus-lora"}
    assert suite.main(["--list", "--only", "perf-train"]) == 0
    assert "python -m bench.perf_train --sizes 1,10,100" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no run is named nope"):
        suite.select("nope")


def test_a_failing_run_fails_the_suite_and_the_rest_still_run(monkeypatch, tmp_path, capsys):
    # Real processes: the suite runs itself, once with an unknown name (exit 1), once listing (exit 0).
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    monkeypatch.setattr(suite, "RUNS", (suite.Run("bad", "bench.suite", ("--only", "nope")),
                                        suite.Run("good", "bench.suite", ("--list",))))
    assert suite.main(["--out", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert "bad: exit 1" in out and "good: exit 0" in out
    assert "failed: bad" in err
