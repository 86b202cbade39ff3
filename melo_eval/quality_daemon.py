"""`melo eval --daemon`: replay a quality stream through the whole daemon pipeline and score what it serves.

1. Every case of the stream becomes an edit event (schemas/edit.v1.json, keyed by model as the
   schema asks; the held-out rephrases are left out, so the daemon never sees them) produced to a
   real Kafka-protocol broker *before* the writer starts. From that backlog the writer forms full
   micro-batches of ``--batch-size`` (``batch.max_size``), as the in-process replay does; only the
   last batch is partial, flushed when the writer reaches the end of the topic.
2. The writer is the one ``melo run`` runs (melo_eval/daemon_run.py): Redis records and lease,
   filesystem snapshots, receipts and announcements on Kafka. It trains with the MeloConfig the
   in-process run would use (``melo_eval.quality.melo_config`` with the overrides) on the same backbone,
   until it is idle.
3. Every event must be accounted for: one receipt on the results topic (applied, rejected or
   duplicate), and the applied ids must agree with the published manifests and with the Redis
   record store. Anything missing stops the run with the ids.
4. At 0, after every ``--every`` edits and at the end (the same rule as ``quality.replay``), the
   version covering exactly the first n edits is loaded the way a serving replica loads it
   (``daemon.serving_state.ServingState``: blob hashes verified, base weights checked, editor
   rebuilt from files on a base model that never trained) and scored by the same ``Evaluator``.
   Row 0 is an editor with no edits (nothing is published yet). Rows also carry ``version`` and
   ``published_seconds``: from the first event produced to that version's publish.

An edit the daemon rejects still counts in the row's n edits (it was asked for and not learned);
the pipeline section of metrics.json counts receipts by status.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from kafka import KafkaProducer
from tqdm import tqdm

from melo_eval import quality
from melo_eval.daemon_run import (
    TOPIC_ROLES,
    RunningWriter,
    Services,
    TimedSnapshots,
    edit_event,
    local_services,
    read_topic,
    writer_settings,
)
from melo_eval.datasets import EditCase, Stream
from melo_eval.methods import MeloMethod

GENERATION_STREAMS = ("zsre", "counterfact", "hallucination")
# Every event is produced before the writer starts, so no batch should wait: a partial batch is
# trained only once the writer has read the whole topic (the worker flushes it when drained).
BACKLOG_WAIT_S = 3600.0
STALL_S = 900.0  # the writer published nothing for this long: report it rather than wait forever
ACCOUNTED = ("applied", "rejected", "duplicate", "not_learned")  # receipt statuses that settle an event
COLUMNS = ("n_edits", "version", "published_seconds", *quality.COLUMNS[1:])


def refuse_unsupported(args: argparse.Namespace) -> None:
    """SystemExit with the reason when ``--daemon`` cannot run what ``args`` ask for."""
    if args.dataset not in GENERATION_STREAMS:
        raise SystemExit(
            f"--daemon replays generation streams only ({', '.join(GENERATION_STREAMS)}), not {args.dataset!r}: "
            "a label-shift stream needs the classifier head the benchmark trains (melo_eval.classifier), which the "
            "daemon cannot load; run it without --daemon"
        )
    if args.method != "melo":
        raise SystemExit(
            f"--daemon trains with the daemon's own editor (--method melo) only; {args.method!r} is not a "
            "daemon trainer: run it without --daemon"
        )


class ServedVersion(MeloMethod):
    """One loaded snapshot version behind the harness surface: it is scored, never trained."""

    def __init__(self, editor: Any, version: int | None) -> None:
        """Wrap ``editor`` (loaded from ``version``'s files); MeloMethod's own init would build a new one."""
        self.name = "melo (daemon)"
        self.config = editor.config
        self.cache_prefix = True
        self.editor = editor
        self.version = version

    def apply_batch(self, cases: Sequence[EditCase]) -> dict[str, float]:
        """Refused: a published version is immutable; edits reach the daemon through the edits topic."""
        raise TypeError(f"version {self.version} is read-only: produce edits to the daemon's edits topic instead")


# --------------------------------------------------------------------------- the writer's run


@dataclass
class PipelineRun:
    """What the writer did with the stream."""

    run: str
    settings: Any
    first_sent: float  # time.time() just before the first event was produced
    versions: list[tuple[int, tuple[str, ...], float]]  # (version, edit ids, published at), in order
    train_seconds: dict[int, float]  # version -> block training seconds up to and including it
    receipts: Counter = field(default_factory=Counter)  # status -> receipts
    skipped: set[str] = field(default_factory=set)  # rejected, duplicate or not-learned edit ids
    not_learned: set[str] = field(default_factory=set)  # edit ids settled by a not_learned receipt
    writer_started: float = 0.0  # time.time() when the writer's loop started (backbone loaded)
    writer_seconds: float = 0.0  # writer's loop start -> idle


def _train_seconds_total(run: str) -> float:
    from daemon.metrics import REGISTRY

    return REGISTRY.get_sample_value("melo_train_seconds_sum", {"model": run}) or 0.0


def run_writer(stream: Stream, config: Any, args: argparse.Namespace, backbone: str, services: Services) -> PipelineRun:
    """Produce the stream, run the writer until idle, and check that every event is accounted for."""
    from daemon.wiring import build_worker
    from melo_testkit.services import create_topics

    run = f"eval-{stream.name}"
    n_batches = -(-len(stream.cases) // args.batch_size)
    settings = writer_settings(
        # Every field, defaults included: the writer applies these over its own preset.
        run, services, backbone=backbone, melo=dataclasses.asdict(config),
        batch={"max_size": args.batch_size, "max_wait_s": BACKLOG_WAIT_S},
        retention={"keep_last": n_batches + 1},  # every version stays loadable for the evaluation
        dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code,
    )
    topics = settings.kafka.topics
    create_topics(services.bootstrap, [getattr(topics, role) for role in TOPIC_ROLES])
    producer = KafkaProducer(bootstrap_servers=services.bootstrap, acks="all", linger_ms=0)
    first_sent = time.time()
    for case in stream.cases:
        value = edit_event(case.edit_id, run, case.prompt, case.target, source="bench.quality", subject=case.subject)
        producer.send(topics.edits, key=run.encode(), value=value)
    producer.flush()
    producer.close()

    worker = build_worker(settings, on_progress=lambda line: None)
    timed = TimedSnapshots(worker.snapshots)
    worker.snapshots = timed
    train_before = _train_seconds_total(run)
    train_seconds: dict[int, float] = {}
    progress = tqdm(total=len(stream.cases), desc=f"daemon on {stream.name}", unit="edit")

    def published(manifest: Any, events: Sequence[Any], learned: frozenset[str]) -> None:
        train_seconds[manifest.version] = _train_seconds_total(run) - train_before
        progress.update(len(events))
        progress.set_postfix(version=manifest.version, learned=f"{len(learned)}/{len(events)}")

    worker.on_edit_published(published)
    started = time.time()
    writer = RunningWriter(worker, settings, until_idle=True)
    try:
        writer.wait_idle(lambda: len(timed.published), STALL_S)
    finally:
        writer.stop()
        progress.close()
    result = PipelineRun(run, settings, first_sent, [], train_seconds, writer_started=started,
                         writer_seconds=time.time() - started)
    for manifest in timed.versions(run):
        if manifest.kind != "edit":
            raise RuntimeError(
                f"version {manifest.version} of {run} is a {manifest.kind}; the replay publishes edits only")
        result.versions.append((manifest.version, manifest.edit_ids, timed.published[manifest.version][0]))
    _account(result, [c.edit_id for c in stream.cases], worker.records, services.bootstrap, topics.results)
    return result


def _account(result: PipelineRun, sent: list[str], records: Any, bootstrap: str, results_topic: str) -> None:
    """Every produced edit has a settling receipt; applied = the manifests' edits = the record store's."""
    settled: dict[str, str] = {}
    for receipt in read_topic(bootstrap, results_topic):
        result.receipts[receipt["status"]] += 1
        if receipt["status"] in ACCOUNTED:
            settled.setdefault(receipt["edit_id"], receipt["status"])
    missing = [edit_id for edit_id in sent if edit_id not in settled]
    if missing:
        raise RuntimeError(
            f"{len(missing)} of {len(sent)} edits have no applied/rejected/duplicate/not_learned receipt: {missing[:10]}")
    applied = {edit_id for edit_id, status in settled.items() if status == "applied"}
    published = {edit_id for _, ids, _ in result.versions for edit_id in ids}
    recorded = records.applied(result.run, sent)
    if not applied == published == recorded:
        raise RuntimeError(
            f"applied edits disagree: receipts {len(applied)}, manifests {len(published)}, "
            f"record store {len(recorded)}; "
            f"receipts but not published {sorted(applied - published)[:10]}, "
            f"published but not recorded {sorted(published - recorded)[:10]}"
        )
    result.skipped = set(settled) - applied
    result.not_learned = {edit_id for edit_id, status in settled.items() if status == "not_learned"}


# --------------------------------------------------------------------------- which versions to score


@dataclass(frozen=True)
class Checkpoint:
    """A version that covers exactly the first ``n_edits`` edits of the stream."""

    n_edits: int
    version: int
    start: int  # index of the first edit of the version's own batch
    published_at: float


def checkpoints(
    case_ids: Sequence[str],
    versions: Sequence[tuple[int, Sequence[str], float]],
    skipped: set[str],
    every: int,
) -> list[Checkpoint]:
    """The versions to score, chosen as ``quality.replay`` chooses batches: the first one at or past
    every ``every`` edits, and the last.

    Each version must hold the next edits of the stream in order (``skipped`` edits, rejected or
    duplicate, may lie between); RuntimeError otherwise, or if the versions do not reach the end.
    """
    covering: list[Checkpoint] = []
    position = 0
    for version, ids, published_at in versions:
        start, pending = position, set(ids)
        while pending:
            if position == len(case_ids):
                raise RuntimeError(
                    f"version {version} holds edits {sorted(pending)[:5]} that are not next in the stream")
            edit_id = case_ids[position]
            if edit_id in pending:
                pending.remove(edit_id)
            elif edit_id not in skipped:
                raise RuntimeError(
                    f"version {version} skips edit {edit_id!r}: the daemon applied the stream out of order")
            position += 1
        while position < len(case_ids) and case_ids[position] in skipped:
            position += 1
        covering.append(Checkpoint(position, version, start, published_at))
    if position != len(case_ids):
        raise RuntimeError(f"the published versions cover {position} of the {len(case_ids)} edits of the stream")
    chosen, next_eval = [], every
    for checkpoint in covering:
        if checkpoint.n_edits >= next_eval or checkpoint.n_edits == len(case_ids):
            chosen.append(checkpoint)
            while next_eval <= checkpoint.n_edits:
                next_eval += every
    return chosen


# --------------------------------------------------------------------------- scoring and report


def score_versions(
    pipeline: PipelineRun, stream: Stream, evaluator: quality.Evaluator, model: Any, tokenizer: Any, every: int
) -> list[dict]:
    """Row 0 on an empty editor, then one row per checkpoint version loaded as a replica loads it."""
    from daemon.serving_state import ServingState
    from daemon.snapshot_store_fs import FsSnapshotStore
    from melo_runtime import MeloConfig, MeloEditor
    from melo_runtime.pretrained import backbone_fingerprint

    config = MeloConfig.from_dict(pipeline.settings.melo)
    weights = backbone_fingerprint(model)  # before any editor attaches to the model
    base = ServedVersion(MeloEditor(model, tokenizer, config), version=None)
    evaluator.record_base(base)
    rows = [{**evaluator.evaluate(base, [], []), "version": None, "published_seconds": None, "train_seconds": 0.0}]
    state = ServingState(FsSnapshotStore(pipeline.settings.snapshot_root), pipeline.run, model, tokenizer,
                         weights_sha256=weights)
    chosen = checkpoints([c.edit_id for c in stream.cases], pipeline.versions, pipeline.skipped, every)
    for checkpoint in tqdm(chosen, desc="scoring published versions", unit="version"):
        started = time.perf_counter()
        served = ServedVersion(state.swap_to(checkpoint.version).editor, checkpoint.version)
        applied = stream.cases[: checkpoint.n_edits]
        row = evaluator.evaluate(served, applied, applied[checkpoint.start :])
        row.update(
            version=checkpoint.version,
            published_seconds=checkpoint.published_at - pipeline.first_sent,
            train_seconds=pipeline.train_seconds.get(checkpoint.version),
            eval_seconds=time.perf_counter() - started,
            # as the in-process replay counts them: edits so far that ended not_learned
            not_learned=sum(case.edit_id in pipeline.not_learned for case in applied),
        )
        rows.append(row)
        tqdm.write(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}))
    return rows


def pipeline_report(pipeline: PipelineRun) -> dict[str, Any]:
    """The "pipeline" section of metrics.json: versions, throughput and receipts."""
    versions, first_sent = pipeline.versions, pipeline.first_sent
    applied = sum(len(ids) for _, ids, _ in versions)
    settings = pipeline.settings
    # Between the first and the last publish: the writer's steady rate, without its start-up.
    sustained = (applied - len(versions[0][1])) / (versions[-1][2] - versions[0][2]) if len(versions) > 1 else None
    return {
        "model": pipeline.run,
        "services": "Tansu Kafka-protocol broker + Redis on loopback (melo_testkit.services), filesystem snapshots",
        "batch_max_size": settings.batch.max_size,
        "batches_formed": [len(ids) for _, ids, _ in versions],
        "versions": [
            {"version": version, "edits": len(ids), "published_seconds": round(at - first_sent, 3),
             "train_seconds": round(pipeline.train_seconds.get(version, 0.0), 3)}
            for version, ids, at in versions
        ],
        "applied_edits": applied,
        "edits_per_s": round(applied / (versions[-1][2] - first_sent), 3) if applied else 0.0,
        "sustained_edits_per_s": round(sustained, 3) if sustained is not None else None,
        "writer_started_seconds": round(pipeline.writer_started - first_sent, 3),
        "writer_seconds": round(pipeline.writer_seconds, 3),
        "receipts": dict(pipeline.receipts),
        "skipped_edit_ids": sorted(pipeline.skipped),
    }


def run(args: argparse.Namespace) -> int:
    """``melo eval --daemon``: the whole pipeline on local services, then the report ``melo eval`` writes."""
    refuse_unsupported(args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    for noisy in ("kafka", "apscheduler", "melo"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from melo_runtime.backbones import load_backbone

    backbone = args.backbone or "smollm2-135m"
    # The replica's base model: it never trains (the writer loads its own copy of the backbone).
    model, tokenizer = load_backbone(backbone, dtype=args.dtype, device=args.device,
                                     trust_remote_code=args.trust_remote_code)
    config = quality.melo_config(model, "generate", args)
    stream = quality.build_stream(args)
    evaluator = quality.Evaluator(stream, tokenizer, generation=not args.no_generation)
    with local_services("melo-eval-daemon-") as services:
        pipeline = run_writer(stream, config, args, backbone, services)
        rows = score_versions(pipeline, stream, evaluator, model, tokenizer, args.every)
    extra = {"backbone": backbone, "melo_config": config.to_dict(), "pipeline": pipeline_report(pipeline)}
    quality.write_report(args.out, args, stream, rows, extra, columns=COLUMNS)
    print(quality.quality_table(rows, COLUMNS))
    print(json.dumps({k: v for k, v in extra["pipeline"].items() if k != "versions"}))
    print(f"wrote {args.out}/metrics.json, table.md, quality.png")
    return 0
