"""docs/edit-events.md is generated from schemas/*.v1.json and must not go stale."""

from __future__ import annotations

import subprocess
import sys

from schemas import Reason, load_schema
from tests.unit.test_ops_common import REPO_ROOT

GENERATOR = REPO_ROOT / "tools" / "gen_event_doc.py"
DOC = REPO_ROOT / "docs" / "edit-events.md"


def test_committed_event_reference_matches_the_schemas() -> None:
    result = subprocess.run([sys.executable, str(GENERATOR), "--check"], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stderr


def test_check_mode_reports_a_stale_reference(tmp_path) -> None:
    stale = tmp_path / "edit-events.md"
    stale.write_text("# Edit and control events\n(outdated)\n")
    result = subprocess.run([sys.executable, str(GENERATOR), "--check", "--output", str(stale)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1 and "is stale" in result.stderr


def test_every_schema_field_and_reason_code_is_in_the_reference() -> None:
    doc = DOC.read_text()
    for name in load_schema("edit")["properties"]:
        assert f"| `{name}` |" in doc
    for reason in Reason:
        assert f"`{reason.value}`" in doc


def test_the_readme_links_the_reference() -> None:
    assert "docs/edit-events.md" in (REPO_ROOT / "README.md").read_text()
