"""docs/configuration.md is generated from daemon.settings.Settings and must not go stale."""

from __future__ import annotations

import functools
import importlib.util
import subprocess
import sys
from types import ModuleType

import pytest

from daemon.settings import Settings
from tests.unit.test_ops_common import REPO_ROOT

GENERATOR = REPO_ROOT / "tools" / "gen_config_doc.py"


@functools.cache
def load_generator() -> ModuleType:
    """tools/ is not a package: load the generator module from its path (once)."""
    spec = importlib.util.spec_from_file_location("gen_config_doc", GENERATOR)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    # dataclasses resolve string annotations through sys.modules, so register before executing.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_committed_configuration_doc_matches_the_settings_object() -> None:
    result = subprocess.run(
        [sys.executable, str(GENERATOR), "--check"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr


def test_check_mode_reports_a_stale_doc(tmp_path) -> None:
    stale = tmp_path / "configuration.md"
    stale.write_text("# Configuration reference\n(outdated)\n")
    result = subprocess.run(
        [sys.executable, str(GENERATOR), "--check", "--output", str(stale)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 1
    assert "is stale" in result.stderr


def test_every_settings_field_is_documented_with_a_description() -> None:
    generator = load_generator()
    rows = [row for section in generator.collect(Settings) for row in section.rows]
    doc = (REPO_ROOT / "docs" / "configuration.md").read_text()
    for row in rows:
        assert row.description, f"{row.toml_key} has no Field(description=...) in daemon/settings.py"
        assert f"`{row.env}`" in doc
    assert "MELO_KAFKA__TOPICS__EDITS" in generator.env_names()


@pytest.mark.parametrize(
    ("env", "value", "read"),
    [
        ("MELO_MODEL", "smollm2-135m", lambda s: s.model),
        ("MELO_BATCH__MAX_SIZE", "7", lambda s: s.batch.max_size),
        ("MELO_KAFKA__TOPICS__EDITS", "acme.edits", lambda s: s.kafka.topics.edits),
        ("MELO_REDIS__USERNAME", "melo-writer", lambda s: s.redis.username),
        ("MELO_SERVE__PORT", "9000", lambda s: s.serve.port),
    ],
)
def test_documented_environment_names_are_the_ones_settings_read(monkeypatch, env, value, read) -> None:
    assert env in load_generator().env_names()
    monkeypatch.setenv(env, value)
    assert str(read(Settings.load())) == value
