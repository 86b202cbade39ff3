"""SpoolSource: ordered reads, positions, partial lines, pause, seek and atomic commits."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from daemon.source_spool import SpoolSource


def write_lines(path: Path, values: list[dict], *, trailing_newline: bool = True) -> None:
    text = "\n".join(json.dumps(v) for v in values)
    path.write_text(text + ("\n" if trailing_newline else ""), encoding="utf-8")


def test_reads_files_in_name_order_with_byte_positions(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    (spool / "melo.edits").mkdir(parents=True)
    write_lines(spool / "melo.edits" / "b.jsonl", [{"n": 3}])
    write_lines(spool / "melo.edits" / "a.jsonl", [{"n": 1}, {"n": 2}])
    source = SpoolSource(spool, tmp_path / "state.json")
    records = source.poll(0, 10)
    assert [json.loads(r.value)["n"] for r in records] == [1, 2, 3]
    assert [(r.position, r.offset) for r in records] == [
        (("melo.edits/a.jsonl", "0"), 0),
        (("melo.edits/a.jsonl", "0"), 9),
        (("melo.edits/b.jsonl", "0"), 0),
    ]
    assert records[1].next_offset == (spool / "melo.edits" / "a.jsonl").stat().st_size
    assert source.poll(0, 10) == [] and source.at_end()


def test_line_without_newline_is_read_only_once_complete(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    (spool / "melo.edits").mkdir(parents=True)
    write_lines(spool / "melo.edits" / "a.jsonl", [{"n": 1}, {"n": 2}], trailing_newline=False)
    source = SpoolSource(spool, tmp_path / "state.json")
    assert [json.loads(r.value)["n"] for r in source.poll(0, 10)] == [1]
    with (spool / "melo.edits" / "a.jsonl").open("a", encoding="utf-8") as handle:
        handle.write("\n")
    assert [json.loads(r.value)["n"] for r in source.poll(0, 10)] == [2]


def test_seek_resumes_from_a_recorded_position(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    (spool / "melo.edits").mkdir(parents=True)
    write_lines(spool / "melo.edits" / "a.jsonl", [{"n": i} for i in range(5)])
    first = SpoolSource(spool, tmp_path / "state.json")
    records = first.poll(0, 2)
    position = {"melo.edits/a.jsonl": {"0": records[-1].next_offset}}
    second = SpoolSource(spool, tmp_path / "state.json")
    second.seek(position)
    assert [json.loads(r.value)["n"] for r in second.poll(0, 10)] == [2, 3, 4]


def test_pause_holds_edits_but_control_still_flows(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    (spool / "melo.edits").mkdir(parents=True)
    (spool / "melo.control").mkdir(parents=True)
    write_lines(spool / "melo.edits" / "a.jsonl", [{"n": 1}])
    write_lines(spool / "melo.control" / "c.jsonl", [{"type": "resume"}])
    source = SpoolSource(spool, tmp_path / "state.json")
    source.pause()
    records = source.poll(0, 10)
    assert [r.topic for r in records] == ["melo.control"]
    source.resume()
    assert [r.topic for r in source.poll(0, 10)] == ["melo.edits"]


def test_commit_persists_offsets_for_a_new_source(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    (spool / "melo.edits").mkdir(parents=True)
    state = tmp_path / "state" / "offsets.json"
    SpoolSource(spool, state).commit({"melo.edits/a.jsonl": {"0": 42}})
    assert SpoolSource(spool, state).committed() == {"melo.edits/a.jsonl": {"0": 42}}
    assert not list(state.parent.glob("*.tmp"))


def test_missing_spool_directory_error_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        SpoolSource(missing, tmp_path / "state.json")


def test_a_jsonl_file_directly_in_the_spool_directory_is_warned_about_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = tmp_path / "spool"
    (spool / "melo.edits").mkdir(parents=True)
    write_lines(spool / "edits.jsonl", [{"n": 1}])
    source = SpoolSource(spool, tmp_path / "state.json")
    with caplog.at_level("WARNING", logger="melo.spool"):
        assert source.poll(0, 10) == []
        source.poll(0, 10)
    warnings = [r.getMessage() for r in caplog.records if "is not read" in r.getMessage()]
    assert len(warnings) == 1
    assert "edits.jsonl" in warnings[0] and str(spool / "melo.edits") in warnings[0]
    assert source.misplaced() == [spool / "edits.jsonl"]
