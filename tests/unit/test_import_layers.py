"""The import layers of pyproject.toml's [tool.importlinter] hold, and a wrong-way import breaks them.

The same check runs in .ci/run (``make lint``) before the tests; here it also runs with the unit tests
so a wrong-way import fails fast, next to the code that introduced it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("schemas", "melo_runtime", "daemon", "melo_testkit", "melo_eval", "bench")
LINT_IMPORTS = str(Path(sys.executable).parent / "lint-imports")


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([LINT_IMPORTS, "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=120)


def test_every_import_contract_is_kept():
    result = _lint(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_runtime_importing_tests_or_redis_breaks_its_contracts(tmp_path: Path):
    for package in PACKAGES:
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    with (tmp_path / "melo_runtime" / "edits.py").open("a") as handle:
        handle.write("\nimport redis  # noqa\nimport tests.conftest  # noqa\n")
    with (tmp_path / "schemas" / "events.py").open("a") as handle:
        handle.write("\nimport melo_runtime  # noqa\n")
    result = _lint(tmp_path)
    assert result.returncode != 0
    out = result.stdout
    assert "Nothing imports the tests; nothing shipped imports the benchmarks BROKEN" in out
    assert "melo_runtime and schemas never import Kafka, Redis or HTTP code BROKEN" in out
    assert "melo_runtime | schemas KEPT" not in out  # schemas -> melo_runtime breaks the layers
    assert "melo_runtime.edits -> redis" in out
