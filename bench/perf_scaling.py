"""Scaling on loopback: several writer daemons and serving replicas sharing one broker, Redis and store.

    python -m bench.perf_scaling --models 3 --writers 2 --replicas 2 --edits-per-model 100

DESIGN.md §7 as docs/scaling.md lays it out, run as separate processes on 127.0.0.1: one Tansu
Kafka-protocol broker and one Redis (``melo_testkit.services``), one filesystem snapshot root, and per model
``--writers`` writer daemons (``melo run``: one holds the model's Redis lease, the others stand by)
plus ``--replicas`` serving processes (``melo serve``, following CURRENT). Each model has its own
consumer group (the default ``melo-writer-<model>``) as the docs require; every model uses the
``tiny-gpt2`` backbone (``backbone`` in its settings), so the run measures the system, not a model.

Daemons are forked from the integration harness's fork server (``melo_testkit/daemon_harness``):
each is its own process calling ``daemon.cli.main(["run" | "serve", ...])`` with its own settings and
PID, killed with a real SIGKILL; the fork server only spares each start the torch import.

Phases, each measured separately:

1. **Throughput** -- ``--edits-per-model`` real zsRE edit events for the first model alone, then as
   many per model for every model at once (models interleaved); edits/s = edits / (last publish -
   start of production), per model and overall, so one writer's rate stands beside all of theirs.
2. **Failover** -- ``--failover-edits`` more per model; as soon as the first model's active writer
   has published one version of them it is SIGKILLed, and ``--outage-edits`` more per model are sent
   while that model has no writer. Takeover = kill -> the standby holds the lease (Redis, polled
   every 20 ms), and kill -> the standby's first published version.
3. **Convergence** (over phases 1-2) -- for every published version v: the time from its manifest's
   ``created_at`` to the moment every replica of that model serves v or newer (the replica's own
   "serving <model> version <n>" log line, millisecond timestamps).
4. **Serving load** -- ``--concurrency`` closed-loop client threads for ``--load-seconds`` against
   one replica, the first model's replicas and every replica (round robin), ``--rounds`` times in
   alternating order, with the writers idle: requests/s, latency, rows routed, answers not from CURRENT.

Then the invariants are checked from the stores: every edit in exactly one version per model,
versions contiguous, one writer per model at any time (fencing tokens non-decreasing, each writer's
versions one unbroken run), Redis agrees with the snapshots, every version verifies. Every process
is stopped by PID.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import os
import re
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from kafka import KafkaProducer

from bench.perf_common import environment, latency_summary, write_report
from melo_eval.tables import markdown_table
from daemon.settings import Settings
from daemon.snapshot_store_fs import FsSnapshotStore
from daemon.snapshots import Manifest
from daemon.wiring import build_records
from melo_testkit.daemon_harness import DaemonProcess, zsre_events
from melo_testkit.services import KafkaBroker, RedisServer, create_topics, free_port, wait_until

TOPIC_ROLES = ("edits", "control", "dlq", "results", "forgotten", "snapshots")
KEYED_ROLES = ("edits", "control")  # keyed by model; the same partition count keeps them ordered together
START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 30.0
LEASE_POLL_S = 0.02
MODEL_STRIDE = 250  # model i edits zsRE facts from i * MODEL_STRIDE on: distinct facts and edit ids
# The replica's log line for a swap (daemon/serving_state.py), with logging's asctime (local time, ms).
_SWAP_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO \S+: serving (\S+) version (\d+)\s*$")

log = logging.getLogger("bench.perf_scaling")


# --------------------------------------------------------------------------- the deployment


@dataclass(frozen=True)
class ClusterSpec:
    """The shape of one loopback deployment."""

    models: int = 3
    writers_per_model: int = 2  # one active writer, the rest standbys fenced by the Redis lease
    replicas_per_model: int = 2
    served_models: int | None = None  # the first this many models get replicas; None = every model
    edits_partitions: int = 3
    batch_max_size: int = 10
    batch_max_wait_s: float = 0.5
    iterations: int | None = None  # training steps per block; None = the backbone preset's
    lease_ttl_s: float = 5.0
    serve_poll_s: float = 0.5
    prefix: str = "scale"

    def model_names(self) -> list[str]:
        """``<prefix>-m0`` ... one namespace per model."""
        return [f"{self.prefix}-m{i}" for i in range(self.models)]

    def served(self) -> list[str]:
        """The models that get serving replicas."""
        return self.model_names()[: self.models if self.served_models is None else self.served_models]


@dataclass
class Member:
    """One daemon process of the deployment (a writer or a serving replica)."""

    model: str
    name: str
    proc: DaemonProcess
    log_path: Path
    port: int | None = None  # serving replicas only

    @property
    def owner(self) -> str:
        """The lease owner id a writer uses (``daemon.wiring.build_worker``: host:pid)."""
        return f"{socket.gethostname()}:{self.proc.pid}"

    @property
    def url(self) -> str:
        """Base URL of a serving replica."""
        if self.port is None:
            raise ValueError(f"{self.name} is a writer, not a serving replica: it has no URL")
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        """Everything the process has written so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        """True while the process runs."""
        return self.proc.poll() is None


class LoopbackCluster:
    """Writers and serving replicas of several models over one broker, one Redis and one snapshot root."""

    def __init__(self, spec: ClusterSpec, root: Path, bootstrap: str, redis_url: str) -> None:
        """Lay the deployment out under ``root`` (configs, logs, snapshots); nothing starts yet."""
        self.spec = spec
        self.root = Path(root)
        self.bootstrap = bootstrap
        self.redis_url = redis_url
        self.topics = {role: f"{spec.prefix}.{role}" for role in TOPIC_ROLES}
        self.writers: list[Member] = []
        self.replicas: list[Member] = []
        self.store = FsSnapshotStore(self.root / "snapshots")
        self._records: dict[str, Any] = {}

    # -- configuration

    def config_path(self, model: str) -> Path:
        """The TOML file every process of ``model`` (writers and replicas) is started with."""
        return self.root / f"{model}.toml"

    def write_configs(self) -> None:
        """Create the topics and write one settings file per model."""
        self.root.mkdir(parents=True, exist_ok=True)
        create_topics(self.bootstrap, [self.topics[r] for r in KEYED_ROLES], partitions=self.spec.edits_partitions)
        create_topics(self.bootstrap, [self.topics[r] for r in TOPIC_ROLES if r not in KEYED_ROLES])
        spec = self.spec
        for model in spec.model_names():
            lines = [
                f'model = "{model}"', 'backbone = "tiny-gpt2"', f'data_dir = "{self.root / "data"}"',
                f'snapshot_root = "{self.store.root}"',
                "[batch]", f"max_size = {spec.batch_max_size}", f"max_wait_s = {spec.batch_max_wait_s}",
                # A fixed iteration count measures delivery, not learning: edits are indexed whether learned or not.
                *(["[melo]", f"iterations = {spec.iterations}", f"max_iterations = {spec.iterations}", "retry_rounds = 0",
                   "index_not_learned = true"] if spec.iterations is not None else []),
                "[metrics]", "enabled = false",  # writers would all want port 9464; /metrics is not measured here
                # group_id left unset: the default melo-writer-<model> is the one-group-per-model layout.
                "[kafka]", f'bootstrap_servers = ["{self.bootstrap}"]',
                "session_timeout_ms = 6000", "heartbeat_interval_ms = 1000",  # Tansu joins take ~half of it
                "[kafka.topics]", *(f'{role} = "{topic}"' for role, topic in self.topics.items()),
                "[redis]", f'url = "{self.redis_url}"', f"lease_ttl_s = {spec.lease_ttl_s}",
                f"lease_renew_s = {spec.lease_ttl_s / 4}", "retry_deadline_s = 60",
                "[serve]", 'follow = "current"', f"poll_s = {spec.serve_poll_s}",
            ]
            self.config_path(model).write_text("\n".join(lines) + "\n", encoding="utf-8")

    def settings(self, model: str) -> Settings:
        """The settings ``model``'s processes run with."""
        return Settings.load(self.config_path(model))

    def records(self, model: str) -> Any:
        """The Redis record store, as the daemons build it."""
        if model not in self._records:
            self._records[model] = build_records(self.settings(model))
        return self._records[model]

    # -- processes

    def _spawn(self, model: str, name: str, argv: list[str], port: int | None = None) -> Member:
        log_path = self.root / "logs" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MELO_")}  # the TOML file is the config
        env |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        return Member(model, name, DaemonProcess(argv, env, log_path), log_path, port)

    def start_writers(self) -> None:
        """Start writer 0 of every model and wait until it holds the lease; then start the standbys
        and wait until each stands by (so which writer is active is known, not raced)."""
        models = self.spec.model_names()
        first = [self._spawn(m, f"{m}-w0", ["run", "--config", str(self.config_path(m))]) for m in models]
        self.writers.extend(first)
        for writer in first:
            self._wait_log(writer, "writer token")
        standbys = [
            self._spawn(m, f"{m}-w{i}", ["run", "--config", str(self.config_path(m))])
            for m in models for i in range(1, self.spec.writers_per_model)
        ]
        self.writers.extend(standbys)
        for writer in standbys:
            self._wait_log(writer, "standing by")

    def start_replicas(self) -> None:
        """Start the serving replicas (``melo serve`` on free ports) and wait until each answers /healthz."""
        started = []
        for model in self.spec.served():
            for i in range(self.spec.replicas_per_model):
                port = free_port()
                argv = ["serve", "--config", str(self.config_path(model)), "--port", str(port)]
                started.append(self._spawn(model, f"{model}-r{i}", argv, port))
        self.replicas.extend(started)
        for replica in started:
            wait_until(lambda r=replica: self._healthy(r), START_TIMEOUT_S, f"{replica.name} to answer /healthz")

    def _healthy(self, replica: Member) -> bool:
        if not replica.alive():
            raise RuntimeError(f"{replica.name} exited with {replica.proc.poll()}:\n{replica.log_text()[-3000:]}")
        return httpx.get(f"{replica.url}/healthz", timeout=2).status_code == 200

    def _wait_log(self, member: Member, needle: str) -> None:
        def seen() -> bool:
            if not member.alive():
                raise RuntimeError(f"{member.name} exited with {member.proc.poll()}:\n{member.log_text()[-3000:]}")
            return needle in member.log_text()

        wait_until(seen, START_TIMEOUT_S, f"{needle!r} in the log of {member.name}", interval_s=0.1)

    def active_writer(self, model: str) -> Member:
        """The writer process that holds ``model``'s lease now."""
        lease = self.records(model).lease_holder(model)
        for writer in self.writers:
            if lease is not None and writer.model == model and writer.owner == lease.owner and writer.alive():
                return writer
        raise LookupError(f"no live writer of {model} holds its lease (lease: {lease})")

    def stop(self) -> None:
        """SIGTERM every live process by PID, wait, SIGKILL what is left."""
        members = self.writers + self.replicas
        for member in members:
            member.proc.send_signal(signal.SIGTERM)
        for member in members:
            try:
                member.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                member.proc.kill()
                member.proc.wait(STOP_TIMEOUT_S)

    # -- events and snapshots

    def produce(self, events: Sequence[dict[str, Any]]) -> None:
        """Send edit events to the edits topic, keyed by model (acks=all, flushed)."""
        producer = KafkaProducer(bootstrap_servers=self.bootstrap, acks="all", linger_ms=5)
        for event in events:
            producer.send(self.topics["edits"], key=event["model"].encode(), value=json.dumps(event).encode())
        producer.flush()
        producer.close()

    def manifests(self, model: str) -> list[Manifest]:
        """Every published version of ``model``, oldest first."""
        return self.store.versions(model)

    def published_ids(self, model: str) -> set[str]:
        """Edit ids in any published version of ``model``."""
        return {i for m in self.manifests(model) for i in m.edit_ids}

    def wait_published(self, expected: dict[str, set[str]], timeout_s: float) -> None:
        """Wait until every model's published versions hold all its ``expected`` edit ids."""
        def done() -> bool:
            return all(ids <= self.published_ids(model) for model, ids in expected.items())

        wait_until(done, timeout_s, "every edit to be published", interval_s=0.2)

    def swaps(self, replica: Member) -> list[tuple[float, int]]:
        """(wall-clock time, version) of every swap the replica logged, oldest first."""
        out = []
        for line in replica.log_text().splitlines():
            match = _SWAP_LINE.match(line)
            if match and match.group(2) == replica.model:
                stamp = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()  # local time
                out.append((stamp, int(match.group(3))))
        return out

    def serving_version(self, replica: Member) -> int | None:
        """The version /readyz reports (None while not ready)."""
        body = httpx.get(f"{replica.url}/readyz", timeout=5).json()
        return body.get("version")


def created_ts(manifest: Manifest) -> float:
    """A manifest's ``created_at`` as a Unix timestamp."""
    return datetime.fromisoformat(manifest.created_at.replace("Z", "+00:00")).timestamp()


def events_for(models: Sequence[str], count: int, start: int) -> tuple[list[dict[str, Any]], dict[str, set[str]]]:
    """``count`` zsRE edit events per model from ``start`` in its own slice of the file, models
    interleaved; plus the ids per model."""
    per_model = [zsre_events(count, model=m, start=start + MODEL_STRIDE * i) for i, m in enumerate(models)]
    interleaved = [e for row in itertools.zip_longest(*per_model) for e in row if e is not None]
    return interleaved, {m: {e["edit_id"] for e in evs} for m, evs in zip(models, per_model, strict=True)}


# --------------------------------------------------------------------------- invariants


def exactly_once_problems(manifests: Sequence[Manifest], expected: set[str]) -> list[str]:
    """Each expected edit in exactly one version, nothing else applied, version numbers 1..n."""
    counts = Counter(i for m in manifests for i in m.edit_ids)
    problems = [f"applied {c} times: {i}" for i, c in sorted(counts.items()) if c > 1]
    problems += [f"never applied: {i}" for i in sorted(expected - set(counts))]
    problems += [f"applied but never sent: {i}" for i in sorted(set(counts) - expected)]
    numbers = [m.version for m in manifests]
    if numbers != list(range(1, len(numbers) + 1)):
        problems.append(f"version numbers are not 1..n: {numbers}")
    return problems


def single_writer_problems(manifests: Sequence[Manifest]) -> list[str]:
    """One writer at any time: fencing tokens never go down, and each owner's versions are one unbroken
    run (an owner that reappears after another one published means two writers interleaved)."""
    problems = []
    tokens = [int(m.writer["token"]) for m in manifests]
    if tokens != sorted(tokens):
        problems.append(f"writer tokens go down: {tokens}")
    runs = [owner for owner, _ in itertools.groupby(m.writer["owner"] for m in manifests)]
    if len(runs) != len(set(runs)):
        problems.append(f"writers interleaved: {runs}")
    # A writer that re-acquires its lease gets a new token (allowed); two owners never share one.
    owners_of = Counter(token for token, _ in {(int(m.writer["token"]), m.writer["owner"]) for m in manifests})
    problems += [f"token {t} used by {n} owners" for t, n in sorted(owners_of.items()) if n > 1]
    return problems


def check_model(cluster: LoopbackCluster, model: str, expected: set[str]) -> list[str]:
    """Every invariant of one model, read back from the snapshot store and Redis."""
    manifests = cluster.manifests(model)
    problems = exactly_once_problems(manifests, expected) + single_writer_problems(manifests)
    records = cluster.records(model)
    current = cluster.store.current(model)
    if records.current_version(model) != current:
        problems.append(f"Redis says version {records.current_version(model)}, CURRENT is {current}")
    missing = expected - records.applied(model, expected)
    if missing:
        problems.append(f"{len(missing)} applied edits missing from Redis, e.g. {sorted(missing)[:3]}")
    problems += [f"version {m.version} does not verify" for m in manifests if cluster.store.verify(model, m.version)]
    return problems


# --------------------------------------------------------------------------- phases


def phase_throughput(cluster: LoopbackCluster, models: Sequence[str], edits_per_model: int, start: int,
                     timeout_s: float) -> dict[str, Any]:
    """Produce a backlog of ``edits_per_model`` for each of ``models`` at once (from ``start`` in each
    model's slice); edits/s per model and overall, from the start of production to the last publish."""
    events, expected = events_for(models, edits_per_model, start=start)
    before = {m: len(cluster.manifests(m)) for m in models}
    started = time.time()
    cluster.produce(events)
    cluster.wait_published(expected, timeout_s)
    per_model = {}
    for model in models:
        new = cluster.manifests(model)[before[model]:]
        seconds = max(created_ts(m) for m in new) - started
        per_model[model] = {"edits": len(expected[model]), "versions": len(new), "seconds": round(seconds, 2),
                            "edits_per_s": round(len(expected[model]) / seconds, 2)}
    seconds = max(row["seconds"] for row in per_model.values())
    total = sum(len(ids) for ids in expected.values())
    return {"expected": expected, "edits": total, "seconds": seconds, "edits_per_s": round(total / seconds, 2),
            "per_model": per_model, "load_average_1m": round(os.getloadavg()[0], 1)}


def phase_failover(cluster: LoopbackCluster, edits_per_model: int, outage_edits: int, start: int,
                   timeout_s: float) -> dict[str, Any]:
    """Produce ``edits_per_model`` more edits per model; SIGKILL the first model's active writer as soon
    as it has published one version of them; produce ``outage_edits`` more per model while the model
    has no writer; time the standby's takeover and wait until every edit is published."""
    if outage_edits < 1:
        raise ValueError(f"outage_edits={outage_edits}: the successor needs at least one edit to publish")
    models = cluster.spec.model_names()
    victim_model = models[0]
    victim = cluster.active_writer(victim_model)
    events, expected = events_for(models, edits_per_model, start=start)
    cluster.produce(events)
    wait_until(lambda: bool(cluster.published_ids(victim_model) & expected[victim_model]), timeout_s,
               f"{victim.name} to publish a version of the failover edits", interval_s=0.02)
    victim.proc.kill()
    killed_at = time.time()
    victim.proc.wait(STOP_TIMEOUT_S)
    pending = len(expected[victim_model] - cluster.published_ids(victim_model))
    outage, outage_expected = events_for(models, outage_edits, start=start + edits_per_model)
    cluster.produce(outage)
    records = cluster.records(victim_model)

    def taken_over() -> bool:
        lease = records.lease_holder(victim_model)
        return lease is not None and lease.owner != victim.owner

    wait_until(taken_over, timeout_s, f"a standby of {victim_model} to take the lease", interval_s=LEASE_POLL_S)
    leased_at = time.time()
    successor = cluster.active_writer(victim_model)
    expected = {m: expected[m] | outage_expected[m] for m in models}
    cluster.wait_published(expected, timeout_s)
    successor_versions = [m for m in cluster.manifests(victim_model) if m.writer["owner"] == successor.owner]
    first_publish = min(created_ts(m) for m in successor_versions)
    return {"expected": expected, "model": victim_model, "killed": victim.name, "successor": successor.name,
            "unpublished_at_kill": pending, "sent_during_outage": outage_edits,
            "lease_taken_s": round(leased_at - killed_at, 2), "first_publish_s": round(first_publish - killed_at, 2),
            "lease_ttl_s": cluster.spec.lease_ttl_s}


def convergence(cluster: LoopbackCluster, timeout_s: float) -> dict[str, Any]:
    """Wait until every replica serves its model's CURRENT; then, per published version, the seconds
    from its manifest's creation until every replica of the model served it or a newer one."""
    for replica in cluster.replicas:
        current = cluster.store.current(replica.model)
        wait_until(lambda r=replica, c=current: cluster.serving_version(r) == c, timeout_s,
                   f"{replica.name} to serve CURRENT = {current}", interval_s=0.1)
    lags: list[float] = []
    final: dict[str, float] = {}
    for model in cluster.spec.served():
        replicas = [r for r in cluster.replicas if r.model == model]
        swaps = [cluster.swaps(r) for r in replicas]
        manifests = cluster.manifests(model)
        for manifest in manifests:
            reached = [min(t for t, v in s if v >= manifest.version) for s in swaps]
            lags.append(max(reached) - created_ts(manifest))
        final[model] = round(lags[-1], 3)
    return {"versions": len(lags), "lag": latency_summary(lags), "final_version_lag_s": final,
            "replicas": len(cluster.replicas), "poll_s": cluster.spec.serve_poll_s}


def serving_load(replicas: Sequence[Member], prompts: dict[str, list[str]], expected_version: dict[str, int],
                 seconds: float, concurrency: int, max_new_tokens: int) -> dict[str, Any]:
    """``concurrency`` closed-loop clients for ``seconds``, round robin over ``replicas``."""
    counter = itertools.count()
    lock = threading.Lock()
    latencies: list[float] = []
    per_replica: Counter = Counter()
    errors: list[str] = []
    routed = wrong_version = 0
    deadline = time.monotonic() + seconds

    def client() -> None:
        nonlocal routed, wrong_version
        with httpx.Client(timeout=60) as http:
            while time.monotonic() < deadline:
                n = next(counter)
                replica = replicas[n % len(replicas)]
                prompt = prompts[replica.model][n % len(prompts[replica.model])]
                began = time.perf_counter()
                try:
                    response = http.post(f"{replica.url}/v1/generate",
                                         json={"prompts": [prompt], "max_new_tokens": max_new_tokens})
                except httpx.HTTPError as error:
                    with lock:
                        errors.append(f"{replica.name}: {error!r}")
                    continue
                took = time.perf_counter() - began
                with lock:
                    if response.status_code != 200:
                        errors.append(f"{replica.name}: HTTP {response.status_code} {response.text[:200]}")
                        continue
                    body = response.json()
                    latencies.append(took)
                    per_replica[replica.name] += 1
                    routed += body["results"][0]["route"] is not None
                    wrong_version += body["version"] != expected_version[replica.model]

    began = time.monotonic()
    threads = [threading.Thread(target=client, name=f"load-{i}") for i in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - began
    ok = len(latencies)
    return {"replicas": len(replicas), "concurrency": concurrency, "seconds": round(elapsed, 1), "ok": ok,
            "errors": len(errors), "error_examples": errors[:3], "requests_per_s": round(ok / elapsed, 2),
            "per_replica": dict(per_replica), "routed_share": round(routed / ok, 3) if ok else 0.0,
            "wrong_version": wrong_version, "latency": latency_summary(latencies) if ok else {}}


# --------------------------------------------------------------------------- the run


def run(args: argparse.Namespace, root: Path, bootstrap: str, redis_url: str,
        on_step: Callable[[str], None] = print) -> dict[str, Any]:
    """Start the deployment, run every phase, check the invariants, stop everything; the report."""
    spec = ClusterSpec(models=args.models, writers_per_model=args.writers, replicas_per_model=args.replicas,
                       edits_partitions=args.partitions, batch_max_size=args.batch, iterations=args.iterations,
                       lease_ttl_s=args.lease_ttl, serve_poll_s=args.poll)
    cluster = LoopbackCluster(spec, root, bootstrap, redis_url)
    cluster.write_configs()
    report: dict[str, Any] = {"spec": dataclasses.asdict(spec)}
    try:
        started = time.monotonic()
        cluster.start_writers()
        cluster.start_replicas()
        report["start_seconds"] = round(time.monotonic() - started, 1)
        on_step(f"{len(cluster.writers)} writers and {len(cluster.replicas)} replicas up in {report['start_seconds']}s")
        models = spec.model_names()
        alone = phase_throughput(cluster, models[:1], args.edits_per_model, 0, args.timeout)
        on_step(f"one writer alone: {alone['edits_per_s']} edits/s")
        together = phase_throughput(cluster, models, args.edits_per_model, args.edits_per_model, args.timeout)
        on_step(f"{len(models)} writers at once: {together['edits_per_s']} edits/s overall")
        failover = phase_failover(cluster, args.failover_edits, args.outage_edits, 2 * args.edits_per_model,
                                  args.timeout)
        on_step(f"failover: lease taken {failover['lease_taken_s']}s, first publish {failover['first_publish_s']}s "
                "after the kill")
        report["convergence"] = convergence(cluster, args.timeout)
        on_step(f"convergence: {report['convergence']['lag']}")
        report["load"] = load_rounds(cluster, args)
        on_step(f"load: {[row['requests_per_s'] for row in report['load']]} req/s")
        expected = {m: alone["expected"].get(m, set()) | together["expected"][m] | failover["expected"][m]
                    for m in models}
        report["checks"] = {m: check_model(cluster, m, expected[m]) for m in models}
        report["lease_lost_lines"] = sum(w.log_text().count("stopping without publishing") for w in cluster.writers)
        report["throughput"] = [{k: v for k, v in row.items() if k != "expected"} for row in (alone, together)]
        report["failover"] = {k: v for k, v in failover.items() if k != "expected"}
        report["versions"] = {m: len(cluster.manifests(m)) for m in models}
        report["writers_by_model"] = {m: writer_runs(cluster.manifests(m)) for m in models}
    finally:
        cluster.stop()
    return report


def load_rounds(cluster: LoopbackCluster, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Serving load against one replica, the first model's replicas and every replica, ``args.rounds``
    times in alternating order (the machine is shared: alternation spreads its load over scenarios)."""
    models = cluster.spec.model_names()
    # Prompts every model was edited on in the all-at-once phase (a few may since be forgotten by conflicts).
    edited, _ = events_for(models, 20, start=args.edits_per_model)
    prompts = {m: [e["prompt"] for e in edited if e["model"] == m] for m in models}
    current = {m: cluster.store.current(m) for m in models}
    groups = [cluster.replicas[:1], [r for r in cluster.replicas if r.model == models[0]], cluster.replicas]
    groups = [g for i, g in enumerate(groups) if g and g not in groups[:i]]
    rows = []
    for round_ in range(args.rounds):
        for group in groups if round_ % 2 == 0 else groups[::-1]:
            row = serving_load(group, prompts, current, args.load_seconds, args.concurrency, args.max_new_tokens)
            rows.append(row | {"round": round_ + 1, "models": len({r.model for r in group}),
                               "load_average_1m": round(os.getloadavg()[0], 1)})
    return rows


def writer_runs(manifests: Sequence[Manifest]) -> list[str]:
    """Which writer published which versions, e.g. ``["v1-v11: host:123", "v12-v14: host:456"]``."""
    runs = []
    for owner, group in itertools.groupby(manifests, key=lambda m: m.writer["owner"]):
        versions = [m.version for m in group]
        runs.append(f"v{versions[0]}-v{versions[-1]}: {owner}")
    return runs


def render(report: dict[str, Any]) -> str:
    """The markdown tables for bench/RESULTS.md and docs/scaling.md."""
    spec, fo, conv = report["spec"], report["failover"], report["convergence"]
    throughput_rows = []
    for phase, row in zip(("first model alone", "all models at once"), report["throughput"], strict=True):
        for model, one in row["per_model"].items():
            throughput_rows.append([phase, model, one["edits"], one["versions"], one["edits_per_s"], ""])
        throughput_rows.append([phase, "**all**", row["edits"], sum(r["versions"] for r in row["per_model"].values()),
                                f"**{row['edits_per_s']}**", row["load_average_1m"]])
    lag = conv["lag"]
    load_rows = [
        [row["round"], f"{row['replicas']} ({row['models']} model{'s' if row['models'] > 1 else ''})",
         f"{row['ok']} / {row['errors']}", row["requests_per_s"], f"{row['latency'].get('p50_ms', 0):,.0f}",
         f"{row['latency'].get('p99_ms', 0):,.0f}", f"{100 * row['routed_share']:.0f}%", row["wrong_version"],
         row["load_average_1m"]]
        for row in report["load"]
    ]
    checks = report["checks"]
    lines = [
        f"{spec['models']} models x {spec['writers_per_model']} writer daemons (1 active + standby, one consumer "
        f"group per model), {conv['replicas']} serving replicas (`serve.follow = \"current\"`, `poll_s` "
        f"{spec['serve_poll_s']}), tiny-gpt2, `batch.max_size` {spec['batch_max_size']}, iterations "
        f"{spec['iterations'] or 'preset'}, lease TTL {spec['lease_ttl_s']} s (renewed every TTL/4), edits and "
        f"control topics with {spec['edits_partitions']} partitions. Start-up of every process: "
        f"{report['start_seconds']} s.",
        "",
        markdown_table(["phase", "model", "edits", "versions", "edits/s", "load avg (1 min) after"], throughput_rows),
        "",
        markdown_table(
            ["failover: SIGKILL of the active writer", "value"],
            [["model / killed -> successor", f"{fo['model']} / {fo['killed']} -> {fo['successor']}"],
             ["its edits sent but unpublished at the kill / sent while it had no writer",
              f"{fo['unpublished_at_kill']} / {fo['sent_during_outage']}"],
             ["kill -> standby holds the lease", f"{fo['lease_taken_s']} s (lease TTL {fo['lease_ttl_s']} s)"],
             ["kill -> standby's first published version", f"{fo['first_publish_s']} s"]],
        ),
        "",
        markdown_table(
            ["convergence: manifest created -> every replica of the model serves it or newer", "value"],
            [["versions measured", conv["versions"]],
             ["p50 / p90 / p99 / max ms", " / ".join(f"{lag[k]:,.0f}" for k in ("p50_ms", "p90_ms", "p99_ms", "max_ms"))],
             ["newest version of each model (s)",
              ", ".join(f"{m} {v}" for m, v in conv["final_version_lag_s"].items())]],
        ),
        "",
        markdown_table(
            ["round", "replicas", "ok / errors", "req/s", "p50 ms", "p99 ms", "rows routed", "not CURRENT",
             "load avg after"],
            load_rows,
        ),
        "",
        "Invariants: " + ("all hold" if not any(checks.values()) else "VIOLATED") + " ("
        + "; ".join(f"{m}: {len(p)} problems" for m, p in checks.items())
        + f"); lease-lost exits: {report['lease_lost_lines']}; versions by writer: "
        + "; ".join(f"{m}: {', '.join(w)}" for m, w in report["writers_by_model"].items()) + ".",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--writers", type=int, default=2, help="writer daemons per model (1 active + standbys)")
    parser.add_argument("--replicas", type=int, default=2, help="serving replicas per model")
    parser.add_argument("--partitions", type=int, default=3, help="partitions of the edits and control topics")
    parser.add_argument("--edits-per-model", type=int, default=100,
                        help="backlog per model in the throughput phases (first model alone, then all at once)")
    parser.add_argument("--failover-edits", type=int, default=30, help="edits per model sent before the kill")
    parser.add_argument("--outage-edits", type=int, default=10, help="edits per model produced right after the kill")
    parser.add_argument("--batch", type=int, default=10, help="batch.max_size")
    parser.add_argument("--iterations", type=int, default=None, help="training steps per block (default: preset)")
    parser.add_argument("--lease-ttl", type=float, default=5.0, help="redis.lease_ttl_s (renewed every TTL/4)")
    parser.add_argument("--poll", type=float, default=0.5, help="serve.poll_s of the replicas")
    parser.add_argument("--load-seconds", type=float, default=15.0)
    parser.add_argument("--concurrency", type=int, default=6, help="closed-loop client threads")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the serving scenarios (alternating order)")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=240.0, help="deadline of each wait")
    parser.add_argument("--out", type=Path, default=Path("bench/out/perf"))
    args = parser.parse_args(argv)
    per_model = 2 * args.edits_per_model + args.failover_edits + args.outage_edits
    if per_model > MODEL_STRIDE:
        parser.error(f"{per_model} edits per model: at most {MODEL_STRIDE} (each model edits its own slice of zsRE)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; write bench/out/perf/perf_scaling.{json,md}. Exit 1 if an invariant failed."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("kafka").setLevel(logging.CRITICAL)  # the broker probe logs refusals until it is up
    env = environment(threads=1)  # every daemon runs torch with one thread
    with tempfile.TemporaryDirectory(prefix="melo-scaling-") as tmp, KafkaBroker() as broker, RedisServer() as redis:
        report = run(args, Path(tmp), broker.bootstrap, redis.url)
    report["environment"] = env
    json_path, md_path = write_report(args.out, "perf_scaling", report, render(report))
    print(md_path.read_text(encoding="utf-8"))
    print(f"wrote {json_path} and {md_path}")
    return 1 if any(report["checks"].values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
