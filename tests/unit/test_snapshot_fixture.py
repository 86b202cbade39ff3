"""Snapshots written by earlier code load bit-identically: same routes, same files, same future.

The fixtures under ``tests/fixtures/snapshot_*`` were written by ``tests/fixtures/write_old_snapshots.py``
with the code of commit 495ec33, before ``melo_runtime.vectordb`` became a package. A refactor that
changes a byte of what a loaded snapshot writes, where it routes, or how its cluster database
evolves fails here.
"""

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest

from melo_runtime import MeloEditor
from melo_runtime.serialization import read_files
from melo_runtime.tiny import tiny_model

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
_spec = importlib.util.spec_from_file_location("write_old_snapshots", FIXTURES / "write_old_snapshots.py")
writer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(writer)


def _files(directory: Path) -> dict[str, bytes]:
    root = directory / "files"
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in root.rglob("*") if path.is_file()}


@pytest.fixture(params=["forget", "split"])
def snapshot(request):
    directory = FIXTURES / f"snapshot_{request.param}"
    return _files(directory), json.loads((directory / "expected.json").read_text())


def test_an_old_snapshot_loads_and_exports_the_same_bytes(snapshot):
    files, _ = snapshot
    model, tokenizer = tiny_model("gpt2")
    editor = MeloEditor.from_files(files, model, tokenizer)
    assert editor.export_files() == files


def test_an_old_snapshot_routes_every_probe_as_when_it_was_written(snapshot):
    files, expected = snapshot
    model, tokenizer = tiny_model("gpt2")
    editor = MeloEditor.from_files(files, model, tokenizer)
    routes = [None if r is None else dataclasses.asdict(r) for r in editor.route(expected["probes"])]
    # Block and cluster exactly; the distance to within float32 rounding (a probe equal to an edit
    # key is ~1e-7 from it, and that noise moves with the BLAS build).
    assert [None if r is None else (r["block"], r["cluster"]) for r in routes] == [
        None if r is None else (r["block"], r["cluster"]) for r in expected["routes"]]
    for got, want in zip(routes, expected["routes"]):
        if want is not None:
            assert got["distance"] == pytest.approx(want["distance"], abs=1e-5)
    assert editor.stats() == expected["stats"]


def test_an_old_snapshots_cluster_database_evolves_as_it_did_when_written(snapshot):
    files, expected = snapshot
    db = read_files(files).db  # a database loaded from the files, as an editor loads it
    assert writer.continuation(db, seed=7) == expected["continuation"]
