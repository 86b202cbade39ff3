"""Every Prometheus metric the daemon and the serving process export, declared once (docs/contracts.md).

All metrics live on the module-level `REGISTRY`, not prometheus_client's global one, so tests and
embedders see exactly these series. Units are in the names (`_seconds`, `_total`); label values
are bounded (model namespaces, topic names, reason codes, route templates — never edit ids).
"""

from __future__ import annotations

from dataclasses import dataclass
from threading import Thread
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REGISTRY = CollectorRegistry(auto_describe=True)

_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# Training a block takes from a fraction of a second (tiny models) to minutes (CPU, big backbones).
_TRAIN_SECONDS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
_PUBLISH_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# Event created upstream -> version containing it published: batching wait + training + publish.
_LATENCY_SECONDS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
_HTTP_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

# Ingest
EVENTS_RECEIVED = Counter(
    "melo_events_received_total", "Raw events read from a source, valid or not.", ["topic"], registry=REGISTRY
)
EDITS_APPLIED = Counter(
    "melo_edits_applied_total", "Edits applied in a published version.", ["model"], registry=REGISTRY
)
DUPLICATES = Counter(
    "melo_duplicates_total",
    "Edit events skipped because their edit_id was already applied.",
    ["model"],
    registry=REGISTRY,
)
REJECTED = Counter(
    "melo_rejected_total", "Events rejected, by machine-readable reason code.", ["reason"], registry=REGISTRY
)
DLQ = Counter(
    "melo_dlq_total", "Events written to the dead-letter topic, by reason code.", ["reason"], registry=REGISTRY
)

# Training and the editor's state
BATCH_SIZE = Histogram(
    "melo_batch_size", "Edits per trained block.", ["model"], buckets=_BATCH_SIZES, registry=REGISTRY
)
TRAIN_SECONDS = Histogram(
    "melo_train_seconds", "Wall time to train one block.", ["model"], buckets=_TRAIN_SECONDS, registry=REGISTRY
)
BLOCKS = Gauge("melo_blocks", "Rank blocks in the current editor state.", ["model"], registry=REGISTRY)
CLUSTERS = Gauge("melo_clusters", "Key clusters in the current editor state.", ["model"], registry=REGISTRY)
CONFLICTS = Counter(
    "melo_conflicts_total", "Edits whose key landed on a cluster with a different label.", ["model"], registry=REGISTRY
)
FORGOTTEN = Counter(
    "melo_forgotten_total",
    "Edits forgotten because a conflicting newer edit shrank their cluster.",
    ["model"],
    registry=REGISTRY,
)
EDITS_NOT_LEARNED = Counter(
    "melo_edits_not_learned_total",
    "Edits the trainer could not learn within its budget: dead-lettered with a not_learned receipt, keys not indexed.",
    ["model"],
    registry=REGISTRY,
)
RETRACTED = Counter("melo_retracted_total", "Edits retracted by a control event.", ["model"], registry=REGISTRY)

# Publishing
SNAPSHOT_VERSION = Gauge("melo_snapshot_version", "Latest version this writer committed.", ["model"], registry=REGISTRY)
PUBLISH_SECONDS = Histogram(
    "melo_publish_seconds",
    "Wall time to publish one snapshot version.",
    ["model"],
    buckets=_PUBLISH_SECONDS,
    registry=REGISTRY,
)
PUBLISH_FAILURES = Counter(
    "melo_publish_failures_total",
    "Snapshot publishes that failed (conflict, I/O, fencing).",
    ["model"],
    registry=REGISTRY,
)
EDIT_LATENCY = Histogram(
    "melo_edit_latency_seconds",
    "From an edit's created_at to the publish of the version containing it.",
    ["model"],
    buckets=_LATENCY_SECONDS,
    registry=REGISTRY,
)
LEASE_HELD = Gauge(
    "melo_lease_held", "1 while this process holds the model's writer lease.", ["model"], registry=REGISTRY
)
ASSIGNED_PARTITIONS = Gauge(
    "melo_assigned_partitions",
    "Source partitions assigned to this writer (edits and control topics; the spool counts as 1).",
    ["model"],
    registry=REGISTRY,
)
SECONDS_WITHOUT_PARTITIONS = Gauge(
    "melo_seconds_without_partitions",
    "How long this process has held the writer lease with no source partition assigned (0 otherwise).",
    ["model"],
    registry=REGISTRY,
)
LAST_COMMIT = Gauge(
    "melo_last_commit_timestamp_seconds", "Unix time of the last committed version.", ["model"], registry=REGISTRY
)

# Monitoring and rollback
ROLLBACKS = Counter(
    "melo_rollbacks_total", "Rollbacks, by who asked (manual / monitor).", ["model", "reason"], registry=REGISTRY
)
MONITOR_PROBE_SCORE = Gauge(
    "melo_monitor_probe_score",
    "Latest score (0..1) of a probe set on the serving version.",
    ["model", "probe_set"],
    registry=REGISTRY,
)

# Serving
SERVING_READY = Gauge(
    "melo_serving_ready", "1 once a version is loaded and requests are answered.", ["model"], registry=REGISTRY
)
SERVING_VERSION = Gauge("melo_serving_version", "Version being served.", ["model"], registry=REGISTRY)
HTTP_REQUESTS = Counter(
    "melo_http_requests_total",
    "HTTP requests, by route template and status code.",
    ["route", "status"],
    registry=REGISTRY,
)
HTTP_REQUEST_SECONDS = Histogram(
    "melo_http_request_seconds",
    "HTTP request latency by route template.",
    ["route"],
    buckets=_HTTP_SECONDS,
    registry=REGISTRY,
)
SWAPS = Counter("melo_swaps_total", "Hot swaps to a new version in this serving process.", ["model"], registry=REGISTRY)


@dataclass
class MetricsServer:
    """A running /metrics endpoint; `port` is the bound port (useful when asked for port 0)."""

    server: WSGIServer
    thread: Thread

    @property
    def port(self) -> int:
        """The TCP port the endpoint listens on."""
        return self.server.server_port

    def close(self) -> None:
        """Stop serving and free the port."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def start_metrics_server(host: str, port: int) -> MetricsServer:
    """Serve `REGISTRY` at http://host:port/metrics on a daemon thread."""
    try:
        server, thread = start_http_server(port, addr=host, registry=REGISTRY)
    except OSError as exc:
        raise OSError(
            exc.errno, f"cannot serve metrics on {host}:{port}: {exc.strerror}; set metrics.port to a free port"
        ) from exc
    return MetricsServer(server, thread)
