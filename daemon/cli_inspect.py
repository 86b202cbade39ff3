"""`melo status`, `melo edits show ID`, `melo inspect route PROMPT`: what the deployment is doing, in a few lines.

- ``status``: the serving version (CURRENT), the writer lease holder, events not yet covered by a
  published version, and the last dead letters with their reasons.
- ``edits show``: an edit's state and every receipt the writer sent for it (daemon/receipts.py).
- ``inspect route``: which cluster, block and edits a prompt reaches in CURRENT, and how far its key
  lies from the cluster centre (it loads the backbone, like a serving replica).
"""

from __future__ import annotations

import argparse
import base64
import json
import time
from pathlib import Path
from typing import Any

from daemon.settings import Settings, TopicsSettings

LAST_ERRORS = 5


def _say(line: str) -> None:
    print(line, flush=True)


def _topics(settings: Settings) -> TopicsSettings:
    return settings.kafka.topics if settings.kafka is not None else TopicsSettings()


# ----------------------------------------------------------------------------- status


def _spool_pending(settings: Settings) -> int:
    """Complete lines in the spool's edit and control files past the committed positions."""
    state = Path(settings.data_dir) / "spool-offsets" / f"{settings.model}.json"
    offsets = json.loads(state.read_text(encoding="utf-8"))["offsets"] if state.exists() else {}
    topics = _topics(settings)
    pending = 0
    for topic in (topics.edits, topics.control):
        for path in sorted((Path(settings.spool_dir or ".") / topic).glob("*.jsonl")):
            start = int(offsets.get(f"{topic}/{path.name}", {}).get("0", 0))
            with path.open("rb") as handle:
                handle.seek(start)
                pending += sum(1 for line in handle if line.endswith(b"\n") and line.strip())
    return pending


def _kafka_pending(settings: Settings) -> int:
    """Consumer-group lag of the writer's group on the edits and control topics."""
    from kafka import KafkaConsumer, TopicPartition

    assert settings.kafka is not None
    consumer = KafkaConsumer(group_id=settings.kafka.group_id, enable_auto_commit=False, **settings.kafka.client_kwargs())
    try:
        partitions = [TopicPartition(topic, p) for topic in (settings.kafka.topics.edits, settings.kafka.topics.control)
                      for p in sorted(consumer.partitions_for_topic(topic) or ())]
        ends = consumer.end_offsets(partitions)
        return sum(max(ends[tp] - (consumer.committed(tp) or 0), 0) for tp in partitions)
    finally:
        consumer.close()


def _last_dead_letters(settings: Settings) -> list[dict[str, Any]]:
    """The newest DLQ records of the file outbox (reason, detail, source, edit id when readable)."""
    path = Path(settings.data_dir) / "outbox" / f"{_topics(settings).dlq}.jsonl"
    if settings.kafka is not None or not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()[-LAST_ERRORS:] if line.strip()]
    for record in records:
        try:
            record["edit_id"] = json.loads(base64.b64decode(record.get("value_b64", ""))).get("edit_id")
        except (ValueError, AttributeError):
            record["edit_id"] = None
    return records


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    """Serving version, lease holder, pending events, last errors."""
    from daemon.snapshot_store_fs import FsSnapshotStore
    from daemon.wiring import build_records

    store = FsSnapshotStore(settings.snapshot_root)
    current = store.current(settings.model)
    _say(f"model {settings.model}: CURRENT version {current if current is not None else 'none yet'} "
         f"(latest {store.latest(settings.model) or 'none'}) under {settings.snapshot_root}")
    holder = build_records(settings).lease_holder(settings.model)
    if holder is None:
        _say("writer: none (no daemon holds the lease)")
    else:
        _say(f"writer: {holder.owner} (token {holder.token}, lease valid {max(holder.expires_at - time.time(), 0):.0f}s more)")
    pending = _kafka_pending(settings) if settings.kafka is not None else _spool_pending(settings)
    _say(f"pending: {pending} events not yet covered by a published version")
    errors = _last_dead_letters(settings)
    if settings.kafka is not None:
        _say(f"errors: dead letters are on the Kafka topic {settings.kafka.topics.dlq}")
    elif not errors:
        _say("errors: no dead letters")
    else:
        _say(f"errors: last {len(errors)} dead letters")
        for record in errors:
            _say(f"  {record.get('edit_id') or '-'}: {record.get('reason')}: {str(record.get('detail'))[:120]} "
                 f"({record.get('source')})")
    return 0


# ----------------------------------------------------------------------------- edits show


def _receipts(settings: Settings, edit_id: str) -> list[dict[str, Any]]:
    """Every receipt of ``edit_id``: the file outbox, or the results topic read from start to end."""
    from daemon.receipts import FileReceipts, receipt_of

    if settings.kafka is None:
        path = Path(settings.data_dir) / "outbox" / f"{TopicsSettings().results}.jsonl"
        return FileReceipts(path, settings.model).receipts(edit_id)
    from kafka import KafkaConsumer, TopicPartition

    topic = settings.kafka.topics.results
    consumer = KafkaConsumer(group_id=None, enable_auto_commit=False, **settings.kafka.client_kwargs())
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(partitions)
        consumer.seek_to_beginning()
        ends = consumer.end_offsets(partitions)
        found: list[dict[str, Any]] = []
        deadline = time.monotonic() + 30
        while any(consumer.position(tp) < ends[tp] for tp in partitions) and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                found += [r for r in (receipt_of(rec.value, settings.model) for rec in records)
                          if r is not None and r["edit_id"] == edit_id]
        return found
    finally:
        consumer.close()


def cmd_edits(args: argparse.Namespace, settings: Settings) -> int:
    """An edit's state and its receipts; exit 1 when there is none."""
    from daemon.receipts import edit_status

    receipts = _receipts(settings, args.edit_id)
    if not receipts:
        _say(f"edit {args.edit_id}: no receipt for model {settings.model} (pending, or never sent)")
        return 1
    status = edit_status(args.edit_id, receipts)
    version = f" in version {status.version}" if status.version is not None else ""
    why = f": {status.reason}" if status.reason else ""
    _say(f"edit {args.edit_id}: {status.status}{version}{why}{f' ({status.detail})' if status.detail else ''}")
    for receipt in receipts:
        at = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(receipt.get("at") or 0))
        _say(f"  {at}Z {receipt.get('status'):<11} version {receipt.get('version')}  "
             f"{receipt.get('reason') or ''} {receipt.get('source') or ''}".rstrip())
    return 0


# ----------------------------------------------------------------------------- inspect route


def cmd_route(args: argparse.Namespace, settings: Settings) -> int:
    """Where ``args.prompt`` is routed in CURRENT: cluster, block, distance vs radius, the cluster's edits."""
    from melo_runtime.backbones import load_backbone

    from daemon.recovery import cluster_records
    from daemon.serving_state import ServingState
    from daemon.snapshot_store_fs import FsSnapshotStore

    if not args.prompt:
        _say('melo inspect route: give the prompt: melo inspect route "The capital of France is"')
        return 2
    store = FsSnapshotStore(settings.snapshot_root)
    version = store.current(settings.model)
    if version is None:
        _say(f"no versions of {settings.model}: every prompt gets the base model")
        return 1
    model, tokenizer = load_backbone(settings.backbone or settings.model,
                                     labels=settings.labels if settings.task == "classify" else None)
    editor = ServingState(store, settings.model, model, tokenizer).load(version).editor
    route = editor.route([args.prompt])[0]
    if route is None:
        _say(f"version {version}: outside every cluster: the base model answers {args.prompt!r}")
        return 0
    clusters = {int(c.get("id", -1)): c for c in cluster_records(store.load_files(settings.model, version))}
    cluster = clusters.get(int(route.cluster), {})
    edits = sorted(set(map(str, cluster.get("edit_ids") or [])))
    _say(f"version {version}: block {route.block}, cluster #{route.cluster} (label {str(cluster.get('label', ''))[:40]!r}), "
         f"distance {route.distance:.4f} within radius {float(cluster.get('radius', 0)):.4f}")
    _say(f"  edits of that cluster: {', '.join(edits[:20])}{' ...' if len(edits) > 20 else ''}")
    return 0


def register(sub: Any, with_config: Any) -> None:
    """Add `status` and `edits` to the `melo` parser (``inspect route`` is dispatched from daemon.cli)."""
    status = with_config(sub.add_parser("status", help="serving version, writer, pending events, last errors"))
    status.set_defaults(func=lambda args: cmd_status(args, _settings(args)))
    edits = with_config(sub.add_parser("edits", help="what happened to an edit (its receipts)"))
    edits.add_argument("action", choices=["show"])
    edits.add_argument("edit_id")
    edits.set_defaults(func=lambda args: cmd_edits(args, _settings(args)))


def _settings(args: argparse.Namespace) -> Settings:
    return Settings.load(Path(args.config) if getattr(args, "config", None) else None)
