"""Issue 12 item 3: a corrupt CURRENT is repaired by `melo rollback` and `melo run` says how.

Embedded default (spool + local records), the real CLI. A byte is flipped in a blob only the newest
version uses, as a disk fault would.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from daemon.cli import main as melo
from daemon.worker import EXIT_RECOVERY
from melo_testkit.daemon_harness import MODEL, Deployment, zsre_events


def flip_a_byte_only_the_newest_version_uses(deployment: Deployment) -> str:
    store = deployment.store()
    newest, older = store.versions(MODEL)[-1], store.versions(MODEL)[:-1]
    shared = {ref.sha256 for m in older for ref in m.files.values()}
    digest = next(ref.sha256 for ref in newest.files.values() if ref.sha256 not in shared)
    path = store.root / MODEL / "blobs" / "sha256" / digest
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    return digest


def test_corrupt_current_is_rolled_back_from_a_verified_version_and_run_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    deployment = Deployment(tmp_path, batch_max_size=4)
    deployment.write_config()
    deployment.feed(zsre_events(8))
    assert deployment.run() == 0, deployment.log_text()[-3000:]
    store = deployment.store()
    assert store.current(MODEL) == 2
    flip_a_byte_only_the_newest_version_uses(deployment)

    assert deployment.run() == EXIT_RECOVERY
    advice = [line for line in deployment.log_text().splitlines() if "does not load" in line]
    assert len(advice) == 1 and 'melo rollback --to 1 --reason "version 2 is corrupt"' in advice[0], advice
    assert "Traceback" not in deployment.log_text()

    config = str(deployment.config_path)
    assert melo(["rollback", "--to", "1", "--reason", "corrupt blob", "--config", config]) == 0
    assert "published version 3" in capsys.readouterr().out
    rollback = store.manifest(MODEL, 3)
    assert (rollback.kind, rollback.restores_version, store.current(MODEL)) == ("rollback", 1, 3)
    undone = {r["edit_id"] for r in deployment.read_topic("results") if r["status"] == "rolled_back"}
    assert undone == set(store.manifest(MODEL, 2).edit_ids)

    deployment.feed(zsre_events(4, start=8))
    assert deployment.run() == 0, deployment.log_text()[-3000:]
    assert store.current(MODEL) == 4 and store.verify(MODEL, 4) == []
    assert set(store.manifest(MODEL, 4).edit_ids) == {e["edit_id"] for e in zsre_events(4, start=8)}


def test_an_unreadable_current_file_is_replaced_by_the_newest_verified_version(tmp_path: Path) -> None:
    deployment = Deployment(tmp_path, batch_max_size=4)
    deployment.write_config()
    deployment.feed(zsre_events(4))
    assert deployment.run() == 0, deployment.log_text()[-3000:]
    (deployment.store().root / MODEL / "CURRENT").write_bytes(b"\xff garbage")
    deployment.feed(zsre_events(4, start=4))
    assert deployment.run() == 0, deployment.log_text()[-3000:]
    assert deployment.store().current(MODEL) == 2
    assert "treating CURRENT as missing" in deployment.log_text()


def test_an_unreadable_current_manifest_gets_the_same_one_line_advice_and_rollback_repairs_it(tmp_path: Path) -> None:
    deployment = Deployment(tmp_path, batch_max_size=4)
    deployment.write_config()
    deployment.feed(zsre_events(8))
    assert deployment.run() == 0, deployment.log_text()[-3000:]
    (deployment.store().root / MODEL / "versions" / "2.json").write_bytes(b"{not json")

    assert deployment.run() == EXIT_RECOVERY
    assert 'melo rollback --to 1 --reason "version 2 is corrupt"' in deployment.log_text()
    assert "Traceback" not in deployment.log_text()
    assert melo(["rollback", "--to", "1", "--reason", "corrupt manifest", "--config", str(deployment.config_path)]) == 0
    store = deployment.store()
    assert (store.current(MODEL), store.manifest(MODEL, 3).restores_version) == (3, 1)
    deployment.feed(zsre_events(4, start=8))
    assert deployment.run() == 0, deployment.log_text()[-3000:]
    assert store.current(MODEL) == 4
