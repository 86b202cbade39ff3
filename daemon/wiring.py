"""Wiring from Settings: the one place that picks the implementations a writer runs on (Kafka or
spool source, Redis or local records, filesystem snapshots, Kafka or file outbox) and loads the
configured backbone once for every editor the writer builds.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.crash import CrashPoints
from daemon.publish import FileOutbox, KafkaOutbox, Outbox, Publisher
from daemon.records import RecordStore
from daemon.snapshot_store_fs import FsSnapshotStore
from daemon.sources import EventSource
from daemon.worker import Worker
from daemon.writer_state import WorkerOptions

if TYPE_CHECKING:
    from daemon.settings import Settings
    from melo_runtime.editor import MeloEditor

# The local record store lives on this machine's disk: a short lease lets a restarted daemon take
# over seconds after a crash (there is no network partition to ride out).
LOCAL_LEASE_TTL_S = 5.0
LOCAL_RETRY_DEADLINE_S = 60.0


class BackboneEditors:
    """:class:`daemon.writer_state.EditorFactory` over one backbone loaded once (on the GPU when
    settings.device allows)."""

    def __init__(
        self,
        backbone: str,
        *,
        task: str,
        labels: list[str],
        device: str,
        overrides: dict[str, Any],
        dtype: str = "auto",
        trust_remote_code: bool = False,
    ) -> None:
        from melo_runtime.backbones import load_backbone
        from melo_runtime.families import model_device
        from melo_runtime.pretrained import backbone_fingerprint

        self.task = task
        self.overrides = dict(overrides)
        self.model, self.tokenizer = load_backbone(
            backbone, task=task, labels=labels or None, dtype=dtype, device=device, trust_remote_code=trust_remote_code
        )
        self.device = str(model_device(self.model))
        self.base_model = {"id": backbone, "weights_sha256": backbone_fingerprint(self.model)}

    def fresh(self) -> MeloEditor:
        """An empty editor: the backbone's preset with ``settings.melo`` overrides on top."""
        from melo_runtime import MeloEditor
        from melo_runtime.presets import preset_for

        return MeloEditor(self.model, self.tokenizer, preset_for(self.model, self.task, self.overrides))

    def from_files(self, files: dict[str, bytes]) -> MeloEditor:
        """The editor a snapshot describes (its own config, whatever the settings say now)."""
        from melo_runtime import MeloEditor

        return MeloEditor.from_files(files, self.model, self.tokenizer)


def topic_names(settings: Settings) -> dict[str, str]:
    """Topic (or spool sub-directory / outbox file) names from settings."""
    from daemon.settings import TopicsSettings

    topics = settings.kafka.topics if settings.kafka is not None else TopicsSettings()
    return topics.model_dump()


def build_records(settings: Settings) -> RecordStore:
    """The record store: Redis when configured, else the local store next to the snapshots."""
    if settings.redis is not None:
        from daemon.records_redis import RedisRecordStore

        return RedisRecordStore(settings.redis.client())
    from daemon.records_local import LocalRecordStore

    return LocalRecordStore(settings.records_dir)


def build_worker(
    settings: Settings,
    *,
    crash: CrashPoints | None = None,
    on_progress: Callable[[str], None] | None = None,
    training_display: Callable[[str], Any] | None = None,
) -> Worker:
    """Assemble a worker from settings: Kafka or spool source, Redis or local records, filesystem
    snapshots, Kafka or file outbox, the configured backbone."""
    topics = topic_names(settings)
    data_dir = Path(settings.data_dir)
    source: EventSource
    if settings.kafka is not None:
        from daemon.source_kafka import KafkaSource

        source = KafkaSource(settings.kafka.consumer_kwargs(), edits_topic=topics["edits"], control_topic=topics["control"])
        outbox: Outbox = KafkaOutbox(settings.kafka.producer_kwargs())
    else:
        from daemon.source_spool import SpoolSource

        source = SpoolSource(
            Path(settings.spool_dir),
            data_dir / "spool-offsets" / f"{settings.model}.json",
            edits_topic=topics["edits"],
            control_topic=topics["control"],
        )
        outbox = FileOutbox(data_dir / "outbox")
    if settings.redis is not None:
        ttl, renew, retry_s = settings.redis.lease_ttl_s, settings.redis.lease_renew_s, settings.redis.retry_deadline_s
    else:
        ttl, renew, retry_s = LOCAL_LEASE_TTL_S, LOCAL_LEASE_TTL_S / 3, LOCAL_RETRY_DEADLINE_S
    options = WorkerOptions(
        model=settings.model,
        task=settings.task,
        owner=f"{socket.gethostname()}:{os.getpid()}",
        batch_max_size=settings.batch.max_size,
        batch_max_wait_s=settings.batch.max_wait_s,
        lease_ttl_s=ttl,
        lease_renew_s=renew,
        retry_deadline_s=retry_s,
        limits=settings.limits.to_limits(),
        reject_other_models=settings.other_model_events == "dead_letter"
        or (settings.other_model_events == "auto" and settings.kafka is None),
    )
    editors = BackboneEditors(
        settings.backbone or settings.model,
        task=settings.task,
        labels=list(settings.labels),
        device=settings.device,
        overrides=settings.melo,
        dtype=settings.dtype,
        trust_remote_code=settings.trust_remote_code,
    )
    return Worker(
        options,
        source=source,
        snapshots=FsSnapshotStore(settings.snapshot_root),
        records=build_records(settings),
        publisher=Publisher(outbox, settings.model, topics, binary_dlq=settings.kafka is not None),
        editors=editors,
        crash=crash,
        on_progress=on_progress,
        training_display=training_display,
    )
