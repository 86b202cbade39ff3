"""Filesystem snapshot store: content addressing, exclusive versions, verification, marks, retention, rollback."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from daemon.errors import CorruptSnapshot, Fenced, SnapshotNotFound, VersionConflict
from daemon.snapshot_store_fs import FsSnapshotStore
from daemon.snapshots import Manifest

MODEL = "tiny-gpt2"


def meta(**overrides: object) -> dict:
    base = {
        "base_model": {"id": "tiny-gpt2", "weights_sha256": "ab" * 32},
        "melo_config": {"task": "generate", "rank_per_block": 2},
        "edit_ids": ["e1", "e2"],
        "edit_counts": {"total": 2, "new": 2},
        "offsets": {"melo.edits": {"0": 2}},
        "stats": {"blocks": 1, "clusters": 2, "conflicts": 0, "forgotten": 0},
        "writer": {"owner": "host:1", "token": 7},
    }
    return base | overrides


def files(n_blocks: int, index: str = "v") -> dict[str, bytes]:
    out = {"config.json": b'{"task": "generate"}', "index.json": index.encode()}
    out |= {f"blocks/{b:06d}.safetensors": f"block-{b}".encode() * 100 for b in range(n_blocks)}
    return out


@pytest.fixture
def store(tmp_path: Path) -> FsSnapshotStore:
    return FsSnapshotStore(tmp_path / "snapshots")


def blob_names(store: FsSnapshotStore) -> set[str]:
    return {p.name for p in (store.root / MODEL / "blobs" / "sha256").iterdir()}


def flip_byte(path: Path) -> None:
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_publish_writes_manifest_then_current_and_files_load_back(store: FsSnapshotStore) -> None:
    assert store.current(MODEL) is None and store.latest(MODEL) is None
    manifest = store.publish(MODEL, files(1), parent=None, meta=meta())
    assert (manifest.version, manifest.parent, manifest.kind, manifest.status) == (1, None, "edit", "new")
    assert store.current(MODEL) == 1
    assert store.load_files(MODEL, 1) == files(1)
    assert store.manifest(MODEL, 1) == manifest
    assert manifest.offsets == {"melo.edits": {"0": 2}} and manifest.edit_ids == ("e1", "e2")
    on_disk = json.loads((store.root / MODEL / "versions" / "1.json").read_text())
    assert Manifest.from_dict(on_disk) == manifest


def test_unchanged_files_are_stored_once_and_not_rewritten(store: FsSnapshotStore) -> None:
    store.publish(MODEL, files(1, index="a"), parent=None, meta=meta())
    block = store.root / MODEL / "blobs" / "sha256" / store.manifest(MODEL, 1).files["blocks/000000.safetensors"].sha256
    inode = block.stat().st_ino
    second = store.publish(MODEL, files(2, index="b"), parent=1, meta=meta(edit_ids=["e3"]))
    assert second.version == 2 and second.parent == 1
    # config + index a + block 0, then index b + block 1: five distinct contents in all.
    assert len(blob_names(store)) == 5
    assert block.stat().st_ino == inode
    assert (
        store.manifest(MODEL, 2).files["blocks/000000.safetensors"]
        == store.manifest(MODEL, 1).files["blocks/000000.safetensors"]
    )


def test_verify_detects_a_flipped_byte_and_load_refuses_it(store: FsSnapshotStore) -> None:
    manifest = store.publish(MODEL, files(2), parent=None, meta=meta())
    assert store.verify(MODEL, 1) == []
    digest = manifest.files["blocks/000001.safetensors"].sha256
    flip_byte(store.root / MODEL / "blobs" / "sha256" / digest)
    problems = store.verify(MODEL, 1)
    assert len(problems) == 1 and "blocks/000001.safetensors" in problems[0] and digest in problems[0]
    with pytest.raises(CorruptSnapshot, match=digest):
        store.load_files(MODEL, 1)


def test_republishing_a_damaged_blob_repairs_it(store: FsSnapshotStore) -> None:
    manifest = store.publish(MODEL, files(1), parent=None, meta=meta())
    flip_byte(store.root / MODEL / "blobs" / "sha256" / manifest.files["config.json"].sha256)
    store.publish(MODEL, files(1), parent=1, meta=meta())
    assert store.verify(MODEL, 1) == [] and store.verify(MODEL, 2) == []


def test_verify_reports_missing_blob_and_unreadable_manifest(store: FsSnapshotStore) -> None:
    manifest = store.publish(MODEL, files(1), parent=None, meta=meta())
    (store.root / MODEL / "blobs" / "sha256" / manifest.files["index.json"].sha256).unlink()
    assert "missing" in store.verify(MODEL, 1)[0]
    (store.root / MODEL / "versions" / "1.json").write_text('{"version": 1')
    assert "not JSON" in store.verify(MODEL, 1)[0]
    with pytest.raises(CorruptSnapshot):
        store.manifest(MODEL, 1)
    with pytest.raises(SnapshotNotFound):
        store.manifest(MODEL, 9)


def test_two_writers_cannot_both_publish_the_same_version(tmp_path: Path) -> None:
    root = tmp_path / "shared"
    FsSnapshotStore(root).publish(MODEL, files(1), parent=None, meta=meta())
    outcomes: list[object] = []
    barrier = threading.Barrier(2)

    def writer(name: str) -> None:
        barrier.wait()
        try:
            outcomes.append(FsSnapshotStore(root).publish(MODEL, files(2, index=name), parent=1, meta=meta()).version)
        except VersionConflict as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=writer, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(map(type, outcomes), key=str) == sorted([int, VersionConflict], key=str)
    assert 2 in outcomes and FsSnapshotStore(root).latest(MODEL) == 2
    assert FsSnapshotStore(root).verify(MODEL, 2) == []


def test_stale_writer_publishing_on_an_old_parent_conflicts(store: FsSnapshotStore) -> None:
    store.publish(MODEL, files(1), parent=None, meta=meta())
    store.publish(MODEL, files(2), parent=1, meta=meta())
    with pytest.raises(VersionConflict, match="v2 already exists"):
        store.publish(MODEL, files(3), parent=1, meta=meta())
    with pytest.raises(VersionConflict):
        store.publish(MODEL, files(3), parent=None, meta=meta())


def test_a_writer_token_older_than_the_newest_seen_can_neither_publish_nor_move_current(
    store: FsSnapshotStore,
) -> None:
    store.publish(MODEL, files(1), parent=None, meta=meta(writer={"owner": "a", "token": 1}))
    assert store.fence_token(MODEL) == 1, "every publish records its token"
    store.fence(MODEL, 2, owner="b")  # b took the lease; a was paused past it
    before = sorted(p.name for p in (store.root / MODEL / "versions").iterdir())
    with pytest.raises(Fenced, match="token 1: it has seen token 2"):
        store.publish(MODEL, files(2), parent=1, meta=meta(writer={"owner": "a", "token": 1}))
    with pytest.raises(Fenced):
        store.restore(MODEL, 1, parent=1, meta={"writer": {"owner": "a", "token": 1}})
    with pytest.raises(Fenced):
        store.set_current(MODEL, 1, token=1)
    with pytest.raises(Fenced):
        store.fence(MODEL, 1)
    assert sorted(p.name for p in (store.root / MODEL / "versions").iterdir()) == before
    assert store.current(MODEL) == 1

    manifest = store.publish(MODEL, files(2), parent=1, meta=meta(writer={"owner": "b", "token": 2}))
    assert (manifest.version, manifest.writer["token"], store.current(MODEL)) == (2, 2, 2)
    store.publish(MODEL, files(3), parent=2, meta=meta(writer={"owner": "c", "token": 5}))
    assert FsSnapshotStore(store.root).fence_token(MODEL) == 5, "the high-water mark is durable and only rises"


def test_publish_without_make_current_leaves_current_until_set(store: FsSnapshotStore) -> None:
    store.publish(MODEL, files(1), parent=None, meta=meta())
    store.publish(MODEL, files(2), parent=1, meta=meta(), make_current=False)
    assert (store.current(MODEL), store.latest(MODEL)) == (1, 2)
    store.set_current(MODEL, 2)
    assert store.current(MODEL) == 2
    with pytest.raises(SnapshotNotFound):
        store.set_current(MODEL, 5)


def test_marks_change_status_without_touching_the_manifest(store: FsSnapshotStore) -> None:
    store.publish(MODEL, files(1), parent=None, meta=meta())
    manifest_path = store.root / MODEL / "versions" / "1.json"
    before = manifest_path.read_bytes()
    store.mark(MODEL, 1, "good", reason="probes passed")
    store.mark(MODEL, 1, "bad", reason="locality 0.4")
    assert store.manifest(MODEL, 1).status == "bad"
    assert manifest_path.read_bytes() == before
    with (store.root / MODEL / "versions" / "1.marks.jsonl").open("a") as handle:
        handle.write('{"status": "pinn')  # torn by a crash: never happened
    assert store.manifest(MODEL, 1).status == "bad"
    with pytest.raises(ValueError, match="new"):
        store.mark(MODEL, 1, "new")


def test_retention_keeps_last_current_good_and_pinned_and_only_unreferenced_blobs_go(store: FsSnapshotStore) -> None:
    parent = None
    for n in range(1, 8):  # v_n holds blocks 0..n-1 and its own index
        parent = store.publish(MODEL, files(n, index=f"i{n}"), parent=parent, meta=meta()).version
    store.mark(MODEL, 2, "good")
    store.mark(MODEL, 3, "pinned")
    store.mark(MODEL, 4, "bad")
    store.set_current(MODEL, 1)  # e.g. an operator pointed serving back at v1
    (store.root / MODEL / "blobs" / "sha256" / ".tmp-crashed").write_bytes(b"half a blob")

    report = store.retain(MODEL, keep_last=2, keep_statuses=frozenset({"good"}))

    assert report.removed_versions == [4, 5]
    assert [m.version for m in store.versions(MODEL)] == [1, 2, 3, 6, 7]
    # Index blobs i4 and i5 were used only by removed versions; every block is still used by v7.
    assert len(report.removed_blobs) == 2 and report.freed_bytes == len("i4") + len("i5") + len("half a blob")
    assert all(store.verify(MODEL, m.version) == [] for m in store.versions(MODEL))
    assert not (store.root / MODEL / "blobs" / "sha256" / ".tmp-crashed").exists()


def test_rollback_is_a_new_version_with_the_old_versions_exact_content(store: FsSnapshotStore) -> None:
    store.publish(MODEL, files(1, index="one"), parent=None, meta=meta())
    store.publish(
        MODEL,
        files(2, index="two"),
        parent=1,
        meta=meta(stats={"blocks": 2, "clusters": 5, "conflicts": 1, "forgotten": 0}),
    )
    store.publish(MODEL, files(3, index="three"), parent=2, meta=meta())
    blobs_before = blob_names(store)

    rolled = store.restore(
        MODEL,
        1,
        parent=3,
        meta={
            "writer": {"owner": "ops", "token": 8},
            "request_id": "r-1",
            "reason": "bad answers",
            "offsets": {"melo.edits": {"0": 9}},
        },
    )

    assert (rolled.version, rolled.kind, rolled.restores_version, rolled.rollback_of) == (4, "rollback", 1, 3)
    assert store.current(MODEL) == 4 and rolled.offsets == {"melo.edits": {"0": 9}}
    assert store.load_files(MODEL, 4) == store.load_files(MODEL, 1)
    assert rolled.stats == store.manifest(MODEL, 1).stats and rolled.edit_ids == ()
    assert blob_names(store) == blobs_before  # nothing copied
    assert [m.version for m in store.versions(MODEL)] == [1, 2, 3, 4]  # history is append-only


def test_invalid_manifest_metadata_is_refused_before_anything_is_published(store: FsSnapshotStore) -> None:
    with pytest.raises(ValueError, match="unknown manifest meta keys"):
        store.publish(MODEL, files(1), parent=None, meta=meta(colour="blue"))
    with pytest.raises(ValueError, match="/stats"):
        store.publish(
            MODEL, files(1), parent=None, meta=meta(stats={"blocks": -1, "clusters": 0, "conflicts": 0, "forgotten": 0})
        )
    with pytest.raises(ValueError, match="files"):
        store.publish(MODEL, {"../escape": b"x"}, parent=None, meta=meta())
    assert store.latest(MODEL) is None and store.current(MODEL) is None
    assert not (store.root / MODEL / "blobs").exists()


def test_model_names_cannot_escape_the_root(store: FsSnapshotStore) -> None:
    with pytest.raises(ValueError, match="not a valid namespace"):
        store.publish("../x", files(1), parent=None, meta=meta())


def test_announced_marks_only_rise_and_start_unknown(store: FsSnapshotStore) -> None:
    store.publish(MODEL, files(1), parent=None, meta=meta())
    assert store.announced(MODEL) is None, "a store that never recorded an announcement says so"
    store.mark_announced(MODEL, 1)
    store.mark_announced(MODEL, 0)
    assert FsSnapshotStore(store.root).announced(MODEL) == 1


def test_manifests_form_a_hash_chain_and_verify_names_an_edited_manifest(store: FsSnapshotStore) -> None:
    for parent in (None, 1, 2):
        store.publish(MODEL, files((parent or 0) + 1), parent=parent, meta=meta())
    assert store.manifest(MODEL, 1).parent_sha256 is None
    assert all(store.verify(MODEL, v) == [] for v in (1, 2, 3))
    for version in (2, 3):  # a middle link (checked by its child) and the tip (checked by HEAD)
        path = store.root / MODEL / "versions" / f"{version}.json"
        doc = json.loads(path.read_bytes())
        doc["edit_ids"] = ["forged"]
        path.write_text(json.dumps(doc, indent=1, sort_keys=True), encoding="utf-8")
        (problem,) = store.verify(MODEL, version)
        assert f"versions/{version}.json was changed after it was published" in problem
    assert store.verify(MODEL, 1) == []


def test_a_manifest_written_before_chaining_still_loads_and_starts_the_chain(store: FsSnapshotStore) -> None:
    store.publish(MODEL, files(1), parent=None, meta=meta())
    path = store.root / MODEL / "versions" / "1.json"
    doc = json.loads(path.read_bytes())
    del doc["parent_sha256"]
    path.write_text(json.dumps(doc), encoding="utf-8")
    (store.root / MODEL / "HEAD").unlink()
    assert store.manifest(MODEL, 1).parent_sha256 is None and store.verify(MODEL, 1) == []
    store.publish(MODEL, files(2), parent=1, meta=meta())
    assert store.manifest(MODEL, 2).parent_sha256 is not None
    assert store.verify(MODEL, 1) == [] and store.verify(MODEL, 2) == []
