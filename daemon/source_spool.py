"""Spool source: a directory of JSONL files, the embedded default when no Kafka is configured.

Layout (sub-directories are named after the Kafka topics, settings.kafka.topics)::

    <spool>/melo.edits/*.jsonl     edit events, one JSON object per line; files are read in name order
    <spool>/melo.control/*.jsonl   control events (pause / resume / rollback / retract)

A position is (file, byte offset of the next unread line): ``{"<topic>/<file name>": {"0": offset}}``. A
line without its trailing newline is not read yet (a writer may still be appending it). The
spool directory is never written to, so a sample stream can live read-only in the repository;
commits go to ``state_path`` (temp file + fsync + rename, so a crash leaves the old or the new
state, never a torn one).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from daemon.sources import Offsets, SourceRecord

_IDLE_STEP_S = 0.05  # how often an empty poll re-checks the directory for appended lines
_MISPLACED_CHECK_S = 5.0  # how often an idle source looks for event files outside the topic folders

log = logging.getLogger("melo.spool")


class SpoolSource:
    """:class:`daemon.sources.EventSource` over a spool directory."""

    def __init__(
        self,
        spool_dir: Path,
        state_path: Path,
        *,
        edits_topic: str = "melo.edits",
        control_topic: str = "melo.control",
    ) -> None:
        self.spool_dir = Path(spool_dir)
        if not self.spool_dir.is_dir():
            raise FileNotFoundError(
                f"spool directory {self.spool_dir} does not exist: create it or point settings.spool_dir "
                f"at a directory holding {edits_topic}/*.jsonl edit files"
            )
        self.state_path = Path(state_path)
        self.edits_topic = edits_topic
        self.control_topic = control_topic
        self._positions: dict[str, int] = {}  # "<topic>/<file name>" -> next byte offset
        self._paused = False
        self._at_end = False
        self._warned: set[str] = set()
        self._next_misplaced_check = 0.0

    def _files(self, topic: str) -> list[Path]:
        folder = self.spool_dir / topic
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.glob("*.jsonl") if p.is_file())

    def _read(self, topic: str, budget: int) -> list[SourceRecord]:
        records: list[SourceRecord] = []
        for path in self._files(topic):
            if len(records) >= budget:
                break
            stream = f"{topic}/{path.name}"
            start = self._positions.get(stream, 0)
            if path.stat().st_size <= start:
                continue
            with path.open("rb") as handle:
                handle.seek(start)
                offset = start
                while len(records) < budget:
                    line = handle.readline()
                    if not line.endswith(b"\n"):
                        break  # EOF, or a line still being written
                    value = line.rstrip(b"\r\n")
                    if value.strip():
                        records.append(
                            SourceRecord(
                                topic=topic,
                                partition="0",
                                offset=offset,
                                key=None,
                                value=value,
                                timestamp_ms=int(time.time() * 1000),
                                next_offset=offset + len(line),
                                stream=stream,
                            )
                        )
                    offset += len(line)
                self._positions[stream] = offset
        return records

    def poll(self, timeout_s: float, max_records: int) -> list[SourceRecord]:
        """Read up to ``max_records`` new lines: control files first, then edit files in name order."""
        deadline = time.monotonic() + max(timeout_s, 0.0)
        while True:
            records = self._read(self.control_topic, max_records)
            if not self._paused and len(records) < max_records:
                records += self._read(self.edits_topic, max_records - len(records))
            self._at_end = not records
            if not records:
                self._warn_misplaced()
            if records or time.monotonic() >= deadline:
                return records
            time.sleep(min(_IDLE_STEP_S, max(deadline - time.monotonic(), 0.0)))

    def misplaced(self) -> list[Path]:
        """Event files the source does not read: ``*.jsonl`` directly in the spool directory."""
        return sorted(p for p in self.spool_dir.glob("*.jsonl") if p.is_file())

    def _warn_misplaced(self) -> None:
        """Warn once per file about events that would otherwise be ignored without a word."""
        now = time.monotonic()
        if now < self._next_misplaced_check:
            return
        self._next_misplaced_check = now + _MISPLACED_CHECK_S
        for path in self.misplaced():
            if path.name not in self._warned:
                self._warned.add(path.name)
                log.warning("spool file %s is not read: edit files belong in %s/, control files in %s/",
                            path, self.spool_dir / self.edits_topic, self.spool_dir / self.control_topic)

    def keepalive(self, timeout_s: float) -> None:
        """A spool has no membership to keep: nothing to do."""

    def commit(self, offsets: Offsets) -> None:
        """Persist ``offsets`` atomically to the state file."""
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        with tmp.open("w", encoding="utf-8") as handle:
            json.dump({"offsets": offsets}, handle, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.state_path)
        dir_fd = os.open(self.state_path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def committed(self) -> Offsets:
        """The offsets last written by :meth:`commit` ({} if never)."""
        if not self.state_path.exists():
            return {}
        return json.loads(self.state_path.read_text(encoding="utf-8"))["offsets"]

    def seek(self, offsets: Offsets) -> None:
        """Read next from ``offsets`` (files not named are read from their start)."""
        prefixes = (f"{self.edits_topic}/", f"{self.control_topic}/")
        self._positions = {
            stream: int(parts.get("0", 0)) for stream, parts in offsets.items() if stream.startswith(prefixes)
        }

    def pause(self) -> None:
        """Stop reading edit files (control files are still read)."""
        self._paused = True

    def resume(self) -> None:
        """Read edit files again."""
        self._paused = False

    def at_end(self) -> bool:
        """True when the last poll found no complete unread line."""
        return self._at_end

    def assigned_partitions(self) -> int:
        """The spool is one partition, always this process's."""
        return 1

    def close(self) -> None:
        """Nothing to release: files are opened per poll."""
