"""Daemon end to end: sustained edits/s and event -> published-version latency, per micro-batch size.

    python -m bench.perf_daemon --backbone tiny-gpt2 --batch-sizes 1 10 100

The whole writer runs as ``melo run`` wires it (``daemon.wiring.build_worker`` + the scheduler):
a real Kafka-protocol broker (Tansu) and a real Redis, both started on loopback by
``melo_testkit.services``, a filesystem snapshot store, receipts and announcements on Kafka. For each
trainer and micro-batch size B (``batch.max_size``), on fresh topics and a fresh model namespace:

1. **Sustained throughput** -- a backlog of ``max(--edits, --min-batches * B)`` real zsRE edit
   events is produced before the writer starts; edits/s = edits published after the first version
   / time from the first to the last publish (excludes start-up: lease, group join, recovery).
2. **Latency** -- with the writer caught up, ``max(--latency-edits, --min-batches * B)`` more
   events are produced open-loop at ``--load-fraction`` x the measured throughput; each event's
   latency is from just before its send to the moment ``publish()`` of the version containing it
   returned (blobs, manifest and CURRENT durable); the delivery part (send -> first poll that
   returned the event) is reported beside it. Partial batches wait at most ``--max-wait``
   seconds (``batch.max_wait_s``), so the mean batch actually formed is reported too.

Trainers: ``melo`` is the real MeloEditor with the backbone's preset; ``noop`` is
:class:`NoOpEditor`, a benchmark control that learns nothing, so its numbers are the pipeline's
own overhead (poll, validate, dedupe in Redis, publish, record in Redis, announce, commit).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from kafka import KafkaProducer

from melo_eval import datasets
from melo_eval.daemon_run import (
    TOPIC_ROLES,
    RunningWriter,
    Services,
    TimedSnapshots,
    edit_event,
    local_services,
    writer_settings,
)
from bench.perf_common import environment, latency_summary, write_report, zsre_edits
from melo_eval.tables import markdown_table
from daemon.settings import Settings
from daemon.wiring import BackboneEditors, build_worker
from melo_runtime import BatchResult, Edit, MeloConfig
from melo_testkit.services import create_topics, wait_until
from melo_runtime.presets import preset_for

TRAINERS = ("melo", "noop")
DRAIN_TIMEOUT_S = 600.0
NOOP_INDEX_FORMAT = "melo.bench.noop/1"
PRESET_ITERATIONS = next(f.default for f in dataclasses.fields(MeloConfig) if f.name == "iterations")


# --------------------------------------------------------------------------- the no-op control


class NoOpEditor:
    """Benchmark control: implements what :class:`daemon.worker.Worker` calls on an editor and learns
    nothing. With it the daemon's numbers are its own overhead, training excluded.

    Its snapshot files are a config and an index of the applied edit ids (JSON), so a version still
    says which edits it holds and recovery can rebuild the control from it.
    """

    def __init__(self, config: MeloConfig, edit_ids: Sequence[str] = (), blocks: int = 0) -> None:
        self.config = config
        self._edit_ids = list(edit_ids)
        self._blocks = blocks

    def apply_batch(self, edits: Sequence[Edit]) -> BatchResult:
        """Accept ``edits`` as one (empty) block."""
        started = time.perf_counter()
        ids = [edit.edit_id for edit in edits]
        self._edit_ids.extend(ids)
        self._blocks += 1
        return BatchResult(
            block_id=self._blocks - 1, edit_ids=ids, clusters_added=0, clusters_expanded=0, conflicts=0,
            forgotten=[], learned={edit_id: True for edit_id in ids}, seconds=time.perf_counter() - started,
            iterations_run=0, final_loss=0.0,
        )

    def check_edit(self, edit: Edit) -> None:
        """Refuse nothing: the control accepts every edit the schema accepted."""

    def retract(self, edit_id: str) -> bool:
        """Drop ``edit_id``; False if it is not held."""
        if edit_id not in self._edit_ids:
            return False
        self._edit_ids.remove(edit_id)
        return True

    def stats(self) -> dict[str, int]:
        """The editor counters the worker reports (no clusters, no keys)."""
        return {"blocks": self._blocks, "clusters": 0, "keys": 0, "edits": len(self._edit_ids),
                "conflicts_total": 0, "forgotten_total": 0, "retracted_total": 0}

    def edit_ids(self) -> set[str]:
        """Edits held."""
        return set(self._edit_ids)

    def export_files(self) -> dict[str, bytes]:
        """``config.json`` and an ``index.json`` listing the edits (no clusters)."""
        index = {"format": NOOP_INDEX_FORMAT, "blocks": self._blocks, "edit_ids": self._edit_ids, "db": {"clusters": []}}
        return {"config.json": json.dumps(self.config.to_dict()).encode(), "index.json": json.dumps(index).encode()}


class NoOpEditors:
    """:class:`daemon.writer_state.EditorFactory` of :class:`NoOpEditor`, on the real backbone's preset config."""

    def __init__(self, real: BackboneEditors) -> None:
        self.base_model = real.base_model
        self.device = real.device
        self._config = preset_for(real.model, real.task)

    def fresh(self) -> NoOpEditor:
        """A control with no edits."""
        return NoOpEditor(self._config)

    def from_files(self, files: dict[str, bytes]) -> NoOpEditor:
        """The control a snapshot of it describes."""
        index = json.loads(files["index.json"])
        if index.get("format") != NOOP_INDEX_FORMAT:
            raise ValueError(f"index.json has format {index.get('format')!r}, not a {NOOP_INDEX_FORMAT} snapshot")
        return NoOpEditor(self._config, index["edit_ids"], index["blocks"])


# --------------------------------------------------------------------------- instrumentation


class TimedSource:
    """The worker's real event source, with the wall time at which each edit event was first polled.

    Splits latency into delivery (producer -> broker -> consumer poll) and the writer's own work.
    """

    def __init__(self, source: Any) -> None:
        self._source = source
        self.polled: dict[str, float] = {}  # edit id -> time.time() of the poll that returned it

    def poll(self, timeout_s: float, max_records: int) -> list[Any]:
        """Poll the real source and note when each edit arrived."""
        records = self._source.poll(timeout_s, max_records)
        now = time.time()
        for record in records:
            if record.topic == self._source.edits_topic:
                self.polled.setdefault(json.loads(record.value)["edit_id"], now)
        return records

    def __getattr__(self, name: str) -> Any:
        return getattr(self._source, name)


# --------------------------------------------------------------------------- one run


@dataclass
class RunSpec:
    """One (trainer, micro-batch size) measurement."""

    trainer: str
    batch: int
    backlog: int
    latency_edits: int


@dataclass
class RunResult:
    spec: RunSpec
    throughput_edits_per_s: float
    throughput_versions: int
    latencies_s: list[float] = field(default_factory=list)
    delivery_s: list[float] = field(default_factory=list)
    offered_rate: float = 0.0
    latency_versions: int = 0
    startup_s: float = 0.0


def settings_for(run: str, spec: RunSpec, args: argparse.Namespace, services: Services) -> Settings:
    """Settings as a deployment would write them, for one run's own model namespace and topics."""
    # A fixed --iterations measures the pipeline, not learning: no extension or retry, edits indexed regardless.
    melo = ({"iterations": args.iterations, "max_iterations": args.iterations, "retry_rounds": 0,
             "index_not_learned": True} if args.iterations else {})
    return writer_settings(run, services, backbone=args.backbone, melo=melo,
                           batch={"max_size": spec.batch, "max_wait_s": args.max_wait})


def run_one(spec: RunSpec, args: argparse.Namespace, edits: list[Edit], services: Services) -> RunResult:
    """Measure one trainer at one micro-batch size on fresh topics; the writer is stopped afterwards."""
    run = f"perf-{spec.trainer}-b{spec.batch}"
    settings = settings_for(run, spec, args, services)
    topics = settings.kafka.topics
    bootstrap = services.bootstrap
    create_topics(bootstrap, [getattr(topics, role) for role in TOPIC_ROLES])
    worker = build_worker(settings, on_progress=lambda line: None)
    if spec.trainer == "noop":
        worker.editors = NoOpEditors(worker.editors)
    timed = TimedSnapshots(worker.snapshots)
    worker.snapshots = timed
    source = TimedSource(worker.source)
    worker.source = source
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
    ids = iter(range(10**9))

    def produce(count: int, pace_per_s: float | None = None) -> dict[str, float]:
        sent: dict[str, float] = {}
        started = time.monotonic()
        for i in range(count):
            if pace_per_s:
                delay = started + i / pace_per_s - time.monotonic()
                if delay > 0:
                    time.sleep(delay)  # open-loop pacing of the producer, not a wait for a service
            n = next(ids)
            edit_id, edit = f"{run}-{n:06d}", edits[n % len(edits)]
            sent[edit_id] = time.time()
            value = edit_event(edit_id, run, edit.prompt, edit.target, source="bench.perf_daemon")
            producer.send(topics.edits, key=run.encode(), value=value)
        producer.flush()
        return sent

    backlog = produce(spec.backlog)
    started = time.time()
    writer = RunningWriter(worker, settings)
    try:
        _wait_published(timed, backlog, writer, run)
        versions = sorted(timed.published.items())
        first_at, first_ids = versions[0][1]
        last_at = versions[-1][1][0]
        drained = spec.backlog - len(first_ids)
        if not drained or last_at <= first_at:
            raise RuntimeError(
                f"{run}: the backlog of {spec.backlog} edits was published in one version; "
                "raise --edits or --min-batches so that throughput spans several versions"
            )
        throughput = drained / (last_at - first_at)
        result = RunResult(spec, round(throughput, 2), len(versions), startup_s=round(first_at - started, 2))
        rate = min(max(args.load_fraction * throughput, 0.5), args.max_rate)
        before = len(timed.published)
        sent = produce(spec.latency_edits, pace_per_s=rate)
        _wait_published(timed, sent, writer, run)
        published = timed.published_at()
        result.latencies_s = [published[edit_id] - at for edit_id, at in sent.items()]
        result.delivery_s = [source.polled[edit_id] - at for edit_id, at in sent.items()]
        result.offered_rate = round(rate, 2)
        result.latency_versions = len(timed.published) - before
        return result
    finally:
        producer.close()
        writer.stop()


def _wait_published(timed: TimedSnapshots, sent: dict[str, float], writer: RunningWriter, run: str) -> None:
    def done() -> bool:
        writer.check_running()
        return set(sent) <= timed.published_at().keys()

    wait_until(done, DRAIN_TIMEOUT_S, f"{len(sent)} edits of {run} to be published", interval_s=0.01)


# --------------------------------------------------------------------------- report


def summarize(result: RunResult) -> dict[str, Any]:
    """One row of the report."""
    spec = result.spec
    return {
        "trainer": spec.trainer,
        "batch_max_size": spec.batch,
        "backlog_edits": spec.backlog,
        "throughput_versions": result.throughput_versions,
        "sustained_edits_per_s": result.throughput_edits_per_s,
        "startup_s": result.startup_s,
        "latency_edits": spec.latency_edits,
        "offered_edits_per_s": result.offered_rate,
        "latency_versions": result.latency_versions,
        "mean_batch_formed": round(spec.latency_edits / max(result.latency_versions, 1), 1),
        **{f"latency_{k}": v for k, v in latency_summary(result.latencies_s).items()},
        **{f"delivery_{k}": v for k, v in latency_summary(result.delivery_s).items() if k != "count"},
    }


def render(report: dict[str, Any]) -> str:
    """Markdown for bench/RESULTS.md."""
    rows = report["runs"]
    head = (
        f"Backbone `{report['backbone']}` (tiny, random weights: the point is the pipeline, not the edits), "
        f"trainer `melo` = MeloEditor with the preset config ({report['iterations']} training iterations/block), `noop` = the "
        "no-op control (pipeline overhead alone). Real Tansu broker + Redis (AOF, appendfsync always) on loopback, "
        f"filesystem snapshots, receipts and announcements on Kafka; batch.max_wait_s = {report['max_wait_s']}."
    )
    table = markdown_table(
        ["trainer", "B", "backlog edits / versions", "sustained edits/s", "offered edits/s", "mean batch formed",
         "p50 ms", "p99 ms", "max ms", "of which delivery p50 / p99 ms"],
        [[r["trainer"], r["batch_max_size"], f"{r['backlog_edits']} / {r['throughput_versions']}",
          r["sustained_edits_per_s"], r["offered_edits_per_s"], r["mean_batch_formed"], r["latency_p50_ms"],
          r["latency_p99_ms"], r["latency_max_ms"], f"{r['delivery_p50_ms']} / {r['delivery_p99_ms']}"] for r in rows],
    )
    return f"{head}\n\n{table}"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.perf_daemon", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="tiny-gpt2", help="a melo_runtime.backbones name (generate task)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 10, 100], help="batch.max_size values")
    parser.add_argument("--trainers", nargs="+", choices=TRAINERS, default=list(TRAINERS))
    parser.add_argument("--edits", type=int, default=200, help="backlog edits for the throughput phase")
    parser.add_argument("--latency-edits", type=int, default=100, help="edits produced open-loop for latency")
    parser.add_argument("--min-batches", type=int, default=5, help="each phase covers at least this many batches")
    parser.add_argument("--load-fraction", type=float, default=0.5, help="offered rate / measured throughput")
    parser.add_argument("--max-rate", type=float, default=200.0, help="cap on the offered rate (edits/s)")
    parser.add_argument("--max-wait", type=float, default=1.0, help="batch.max_wait_s (seconds)")
    parser.add_argument("--iterations", type=int, default=None, help="training steps per block (default: preset)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--data-dir", type=Path, default=datasets.DEFAULT_DATA_DIR)
    parser.add_argument("--out", type=Path, default=Path("bench/out/perf"))
    args = parser.parse_args(argv)
    if args.min_batches < 2:
        parser.error(f"--min-batches={args.min_batches} must be >= 2: throughput is timed between versions")
    for name in ("edits", "latency_edits", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    if any(b < 1 for b in args.batch_sizes):
        parser.error(f"--batch-sizes {args.batch_sizes}: every size must be >= 1")
    if not 0 < args.load_fraction <= 1 or args.max_rate <= 0 or args.max_wait <= 0:
        parser.error("--load-fraction must be in (0, 1], --max-rate and --max-wait > 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Start the broker and Redis, measure every (trainer, batch size), write ``perf_daemon.json`` / ``.md``."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    for noisy in ("kafka", "apscheduler", "melo"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    env = environment(args.threads)
    edits = zsre_edits(1000, args.data_dir)
    rows = []
    with local_services("melo-perf-daemon-") as services:
        for batch in args.batch_sizes:
            for trainer in args.trainers:
                spec = RunSpec(trainer, batch, max(args.edits, args.min_batches * batch),
                               max(args.latency_edits, args.min_batches * batch))
                row = summarize(run_one(spec, args, edits, services))
                rows.append(row)
                print(json.dumps(row), flush=True)
    report = {"environment": env, "backbone": args.backbone, "iterations": args.iterations or PRESET_ITERATIONS, "max_wait_s": args.max_wait,
              "load_fraction": args.load_fraction, "runs": rows}
    json_path, md_path = write_report(args.out, "perf_daemon", report, render(report))
    print(md_path.read_text(encoding="utf-8"))
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
