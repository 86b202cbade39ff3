"""``melo``: run the daemon, feed it, inspect and steer its snapshots.

    melo run [--config F] [--until-idle]      the writer (Kafka or the embedded spool default)
    melo produce FILE [--topic T]             JSONL edit events → Kafka (key = each event's model)
    melo snapshots list | show N | verify [N]
    melo inspect clusters [--limit K] | route PROMPT
    melo status                               serving version, writer, pending events, last errors
    melo edits show EDIT_ID                   an edit's state and receipts
    melo rollback --to N --reason R           new version with N's content
    melo retract EDIT_ID --reason R           new version without that edit
    melo serve ...                            HTTP serving (daemon/server.py)
    melo eval ...                             quality evaluation (melo_eval/cli.py)
    melo preset --backbone PATH               the MELO preset derived for a backbone, as TOML (daemon/preset_cli.py)

``rollback`` and ``retract`` keep a single writer: if a daemon holds the model's lease they write a
control event (Kafka control topic, or the spool's control directory) that the running daemon
executes in stream order, and wait for its version or its refusal (``--no-wait``: only send);
otherwise they take the lease themselves and publish directly.

A failing command prints one line on stderr and exits non-zero (``--debug`` adds the traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import traceback
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.cli_errors import run_reporting
from daemon import preset_cli
from daemon.settings import Settings

if TYPE_CHECKING:
    from schemas.events import ControlType

log = logging.getLogger("melo")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("melo")
    except PackageNotFoundError:  # a checkout on PYTHONPATH without `pip install -e .`
        return "unknown (not installed)"


def _training_bar(description: str) -> Any:
    """A live line on the terminal while a block trains (time so far; the block's iterations are
    the trainer's business)."""
    from tqdm import tqdm

    return tqdm(desc=description, total=None, file=sys.stderr, leave=False, bar_format="{desc}: {elapsed} elapsed")


def _load_settings(args: argparse.Namespace) -> Settings:
    return Settings.load(Path(args.config) if getattr(args, "config", None) else None)


def _say(line: str) -> None:
    print(line, flush=True)


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("kafka", "apscheduler", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# ----------------------------------------------------------------------------- run


def cmd_run(args: argparse.Namespace) -> int:
    """Run the writer until SIGTERM/SIGINT (or, with --until-idle, until the source is drained).

    The monitor checks every edit version right after it is published (on the loop, before the next
    batch trains) and CURRENT every ``monitor.interval_s``; with ``monitor.auto_rollback`` it rolls
    a breaching version back, otherwise it only scores, marks and exports metrics.
    """
    from daemon.crash import CrashPoints
    from daemon.errors import WrongBaseWeights
    from daemon.monitor import monitor_for_worker
    from daemon.scheduler import start_scheduler
    from daemon.wiring import build_worker
    from daemon.worker import EXIT_RECOVERY

    settings = _load_settings(args)
    crash = CrashPoints(os.environ.get("MELO_CRASH_AT"))
    started = time.monotonic()
    try:
        worker = build_worker(settings, crash=crash, on_progress=_say,
                              training_display=_training_bar if sys.stderr.isatty() else None)
    except (ValueError, OSError) as error:  # a backbone or spool that cannot load: say why, no traceback
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(f"melo run: error: cannot start: {error}", file=sys.stderr)
        return 2
    _say(
        f"melo run: model {settings.model} on backbone {settings.backbone}, source "
        f"{'kafka ' + ','.join(settings.kafka.bootstrap_servers) if settings.kafka else 'spool ' + str(settings.spool_dir)}, "
        f"records {'redis' if settings.redis else 'local ' + str(settings.records_dir)}, "
        f"snapshots {settings.snapshot_root}, device {worker.editors.device}"
    )

    def on_signal(signum: int, _frame: Any) -> None:
        _say(f"melo run: {signal.Signals(signum).name} received; stopping after the current step")
        worker.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if settings.metrics.enabled:
        from daemon import metrics

        metrics.start_metrics_server(settings.metrics.host, settings.metrics.port)
    scheduler = start_scheduler(worker, settings)
    monitor = monitor_for_worker(worker, settings)
    monitor.schedule(scheduler)
    worker.on_edit_published(monitor.after_publish)
    learned: set[str] = set()  # for the summary: the edit ids the trainer reported learned this run
    worker.on_edit_published(lambda _manifest, _events, learned_ids: learned.update(learned_ids))
    try:
        status = worker.run(until_idle=args.until_idle)
    except WrongBaseWeights as error:
        _say(f"melo run: {error}")
        return 2
    finally:
        scheduler.shutdown(wait=False)
    if status == EXIT_RECOVERY:
        return status  # the log line says what to do; there is nothing to summarise
    _print_summary(settings, worker, monitor, learned, time.monotonic() - started, args.config)
    sys.stdout.flush()
    sys.stderr.flush()
    if worker.training_abandoned:
        # The abandoned training thread cannot be interrupted; nothing of it was published.
        os._exit(status)
    return status


def _print_summary(
    settings: Settings, worker: Any, monitor: Any, learned: set[str], seconds: float, config_path: str | None
) -> None:
    p = worker.progress
    stats = worker.editor.stats() if worker.editor is not None else {}
    root = Path(settings.snapshot_root).resolve()
    _say("")
    _say(f"melo run: done in {seconds:.1f}s")
    _say(f"  events read        {p.events}")
    _say(f"  edits applied      {p.applied}  (duplicates {p.duplicates}, rejected {p.rejected}, dead-lettered {p.dead_lettered})")
    _say(f"  edits not learned  {p.not_learned}  (dead-lettered with a not_learned receipt; their inputs keep the base answer)")
    _say(f"  versions published {p.versions_published}  (serving version: {worker.version})")
    _say(
        f"  blocks {stats.get('blocks', 0)}, clusters {stats.get('clusters', 0)}, conflicts {stats.get('conflicts_total', 0)}, "
        f"forgotten {stats.get('forgotten_total', 0)}, edits reachable {len(worker.editor.edit_ids()) if worker.editor else 0}"
    )
    _print_edit_examples(worker, monitor, learned)
    _say(f"  CURRENT            {root / settings.model / 'CURRENT'}")
    if settings.kafka is None:
        _say(f"  receipts / DLQ     {Path(settings.data_dir).resolve() / 'outbox'}")
    config = f" --config {config_path}" if config_path else ""
    _say(f"  inspect it         melo snapshots list{config}   ·   melo inspect clusters{config}")
    route, field = ("classify", "texts") if settings.task == "classify" else ("generate", "prompts")
    _say(f"  query it           melo serve{config}   then   curl -s localhost:{settings.serve.port}/v1/{route} "
         f"-H 'content-type: application/json' -d '{{\"{field}\": [\"<an edited prompt>\"]}}'")


# Edited-vs-base examples in the run summary: few and short, so the summary costs seconds.
EXAMPLE_EDITS = 3
EXAMPLE_TOKENS = 8


def _print_edit_examples(worker: Any, monitor: Any, learned: set[str]) -> None:
    """Show that the edits work: the trainer's learned count, and answers of the CURRENT snapshot.

    The examples are learned edits still reachable in CURRENT (the monitor's edit probes), each
    answered greedily by CURRENT and by the base model, plus one locality (NQ) probe whose answer
    must not change. The base answers come from the monitor's base editor (an editor with no edits
    over the same model), so they are produced the way every version's answers are.
    """
    p = worker.progress
    if p.applied:
        _say(f"  edits learned      {len(learned)} of {p.applied} applied this run "
             "(trainer-reported: every target token is the model's greedy choice)")
    current = monitor.state.store.current(monitor.model_name)
    if current is None:
        return
    editor = monitor.state.load(current).editor
    if editor.config.task != "generate":
        return
    base = monitor.base_editor(editor.config)
    reachable = editor.edit_ids()
    examples = [probe for probe in monitor.probes.edits.values() if probe.edit_id in reachable][:EXAMPLE_EDITS]
    if not examples:
        return

    def answer(of: Any, prompt: str) -> str:
        # One prompt per call, as the monitor compares, so padding cannot change an answer.
        lines = of.generate([prompt], max_new_tokens=EXAMPLE_TOKENS)[0].strip().splitlines()
        return lines[0] if lines else ""

    _say(f"  answers of version {current} (CURRENT) vs the base model, greedy, {EXAMPLE_TOKENS} new tokens:")
    for probe in examples:
        edited = answer(editor, probe.prompt)
        hit = "✓" if edited.startswith(probe.expected.strip()) else "✗"
        _say(f"    {probe.prompt}")
        _say(f"      → base {answer(base, probe.prompt)!r}  → edited {edited!r} {hit}  (target {probe.expected!r})")
    if monitor.probes.locality:
        probe = monitor.probes.locality[0]
        route = editor.route([probe.prompt])[0]
        before, after = answer(base, probe.prompt), answer(editor, probe.prompt)
        _say("  locality probe (an NQ question no edit is about), must keep the base answer:")
        _say(f"    {probe.prompt}")
        _say(f"      → base {before!r}  → edited {after!r} {'unchanged ✓' if before == after else 'CHANGED ✗'}  "
             f"({'routed to no block: the base model answers' if route is None else f'routed to block {route.block}'})")


# ----------------------------------------------------------------------------- produce


def cmd_produce(args: argparse.Namespace) -> int:
    """Send every line of a JSONL file to Kafka, keyed by the event's model."""
    from kafka import KafkaProducer

    settings = _load_settings(args)
    if settings.kafka is None:
        _say("melo produce: no [kafka] settings; for the embedded default copy the file into "
             f"{Path(settings.spool_dir) / 'melo.edits'}/ instead")
        return 2
    topic = args.topic or settings.kafka.topics.edits
    producer = KafkaProducer(**settings.kafka.producer_kwargs())
    sent = 0
    with Path(args.file).open("rb") as handle:
        for line in handle:
            value = line.rstrip(b"\r\n")
            if not value.strip():
                continue
            try:
                model = json.loads(value).get("model")
            except (ValueError, AttributeError):
                model = None  # malformed lines are sent as-is: the daemon dead-letters them
            key = model.encode() if isinstance(model, str) else None
            producer.send(topic, key=key, value=value)
            sent += 1
    producer.flush()
    producer.close()
    _say(f"melo produce: sent {sent} events from {args.file} to {topic}")
    return 0


# ----------------------------------------------------------------------------- snapshots / inspect


def _store(settings: Settings) -> Any:
    from daemon.snapshot_store_fs import FsSnapshotStore

    return FsSnapshotStore(settings.snapshot_root)


def cmd_snapshots(args: argparse.Namespace) -> int:
    """list / show / verify snapshot versions."""
    settings = _load_settings(args)
    store = _store(settings)
    model = settings.model
    current = store.current(model)
    if args.action == "list":
        manifests = store.versions(model)
        if not manifests:
            _say(f"no versions of {model} under {settings.snapshot_root}")
            return 0
        _say(f"{'':2}{'version':>7} {'kind':8} {'status':7} {'new':>5} {'edits':>6} {'blocks':>6} {'clusters':>8}  created")
        for m in manifests:
            mark = "*" if m.version == current else " "
            _say(f"{mark:2}{m.version:>7} {m.kind:8} {m.status:7} {m.edit_counts['new']:>5} {m.edit_counts['total']:>6} "
                 f"{m.stats.get('blocks', 0):>6} {m.stats.get('clusters', 0):>8}  {m.created_at}")
        _say(f"(* = CURRENT, {Path(settings.snapshot_root).resolve() / model / 'CURRENT'})")
        return 0
    if args.action == "show":
        version = args.version if args.version is not None else current
        if version is None:
            _say(f"no versions of {model}")
            return 1
        manifest = store.manifest(model, version)
        if args.json:
            _say(json.dumps(manifest.to_dict(), indent=2, sort_keys=True))
        else:
            _show_manifest(manifest, current)
        return 0
    versions = [args.version] if args.version is not None else [m.version for m in store.versions(model)]
    bad = 0
    for version in versions:
        problems = store.verify(model, version)
        bad += bool(problems)
        _say(f"version {version}: {'OK' if not problems else 'BROKEN: ' + '; '.join(problems[:5])}")
    return 1 if bad else 0


def _show_manifest(m: Any, current: int | None) -> None:
    """A manifest in a dozen lines (``--json`` prints all of it)."""
    _say(f"version {m.version}{' (CURRENT)' if m.version == current else ''}: {m.kind}, status {m.status}, "
         f"parent {m.parent}, created {m.created_at}")
    if m.restores_version is not None:
        _say(f"  restores version {m.restores_version}")
    if m.request_id or m.reason:
        _say(f"  request {m.request_id or '-'}: {m.reason or ''}")
    _say(f"  base model {m.base_model.get('id')} (weights {str(m.base_model.get('weights_sha256'))[:12]}…)")
    _say(f"  edits: {m.edit_counts.get('new', 0)} new, {m.edit_counts.get('total', 0)} reachable"
         + (f" — {', '.join(m.edit_ids[:8])}{' …' if len(m.edit_ids) > 8 else ''}" if m.edit_ids else ""))
    _say("  stats: " + ", ".join(f"{k} {v}" for k, v in sorted(m.stats.items())))
    _say(f"  files: {len(m.files)}, {m.total_bytes:,} bytes; writer {m.writer.get('owner')} (token {m.writer.get('token')})")
    covered = sum(len(parts) for parts in m.offsets.values())
    _say(f"  source positions covered: {covered} (--json for the manifest, offsets and MELO config)")


def cmd_inspect(args: argparse.Namespace) -> int:
    """Print the cluster table of the serving version, or (``route``) where one prompt is routed."""
    from daemon.recovery import cluster_records

    settings = _load_settings(args)
    if args.what == "route":
        from daemon.cli_inspect import cmd_route

        return cmd_route(args, settings)
    store = _store(settings)
    version = store.current(settings.model)
    if version is None:
        _say(f"no versions of {settings.model}")
        return 1
    clusters = cluster_records(store.load_files(settings.model, version))
    _say(f"model {settings.model} version {version}: {len(clusters)} clusters")
    for cluster in clusters[: args.limit]:
        members = cluster.get("edit_ids") or []  # one entry per member key (prompt or rephrase)
        edits = sorted(set(map(str, members)))
        _say(f"  #{cluster.get('id', '?')} radius {float(cluster.get('radius', 0)):.4f} "
             f"label {str(cluster.get('label', ''))[:40]!r} keys {len(members)} edits {', '.join(edits)[:80]}")
    if len(clusters) > args.limit:
        _say(f"  ... {len(clusters) - args.limit} more (--limit)")
    return 0


# ----------------------------------------------------------------------------- rollback / retract


def _send_control(settings: Settings, kind: ControlType, reason: str, request_id: str, **fields: Any) -> str:
    """Send one control event on the writer's control channel; returns where it went."""
    from daemon.control_ops import control_sender
    from schemas.events import ControlEvent

    event = ControlEvent(type=kind, model=settings.model, request_id=request_id, reason=reason,
                         created_at=datetime.now(UTC), **fields)
    send = control_sender(settings, sender="cli")
    try:
        send(event)
    finally:
        send.close()
    return send.destination


def _steer_running(args: argparse.Namespace, settings: Settings, holder: Any, kind: ControlType, **fields: Any) -> int:
    """Hand the request to the running writer; unless --no-wait, wait for its version or its refusal."""
    from daemon.control_outcome import dead_letter_watch, wait_for_outcome

    request_id = f"cli-{uuid.uuid4().hex[:12]}"
    if args.no_wait:
        where = _send_control(settings, kind, args.reason, request_id, **fields)
        _say(f"melo {kind}: the running daemon ({_holder_text(holder)}) holds the lease; "
             f"control event written to {where} (request {request_id}; not waiting: --no-wait)")
        return 0
    store = _store(settings)
    after = store.latest(settings.model) or 0
    watch = dead_letter_watch(settings)  # before sending: its record cannot slip past
    try:
        _send_control(settings, kind, args.reason, request_id, **fields)
        _say(f"melo {kind}: sent to the running daemon ({_holder_text(holder)}); waiting up to {args.wait_s:g}s")
        outcome = wait_for_outcome(store, settings.model, request_id, after=after, dead_letters=watch,
                                   timeout_s=args.wait_s)
    finally:
        watch.close()
    if outcome is None:
        _say(f"melo {kind}: no outcome within {args.wait_s:g}s; the daemon will still execute {request_id} in "
             "stream order: check `melo snapshots list`")
        return 2
    if not outcome.ok:
        _say(f"melo {kind}: failed: {outcome.detail} ({outcome.reason})")
        return 1
    _say(f"melo {kind}: published version {outcome.version} (CURRENT)")
    return 0


def _holder_text(holder: Any) -> str:
    owner = getattr(holder, "owner", None)
    return str(owner) if owner is not None else str(holder)


def _steer(args: argparse.Namespace, kind: ControlType, **fields: Any) -> int:
    from daemon.wiring import build_records, build_worker

    settings = _load_settings(args)
    holder = build_records(settings).lease_holder(settings.model)
    if holder is not None:
        return _steer_running(args, settings, holder, kind, **fields)
    from daemon.errors import CorruptSnapshot
    from daemon.recovery import RecoveryError

    worker = build_worker(settings, on_progress=_say)
    try:
        # A rollback is how a corrupt CURRENT is repaired, so it must not need CURRENT to load.
        if not worker.start(tolerate_corrupt=kind == "rollback"):
            return 1
    except (RecoveryError, CorruptSnapshot) as error:
        _say(f"melo {kind}: {error}")
        return 1
    try:
        if kind == "rollback":
            manifest = worker.rollback(fields["to_version"], args.reason, request_id="cli")
        else:
            manifest = worker.retract(fields["edit_id"], args.reason, request_id="cli")
    except ValueError as error:
        _say(f"melo {kind}: {error}")
        return 1
    finally:
        worker.close()
    _say(f"melo {kind}: published version {manifest.version} (CURRENT)")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    """Roll back to a version (new version, same content)."""
    return _steer(args, "rollback", to_version=args.to)


def cmd_retract(args: argparse.Namespace) -> int:
    """Retract one edit (new version without it)."""
    return _steer(args, "retract", edit_id=args.edit_id)


# ----------------------------------------------------------------------------- parser


CORE_COMMANDS = ("run", "produce", "snapshots", "inspect", "rollback", "retract", "eval", "status", "edits", "preset")


def build_parser(*, optional: bool = True) -> argparse.ArgumentParser:
    """The ``melo`` argument parser (subcommands above, plus ``serve``/``eval`` when ``optional``:
    importing them costs seconds, so ``main`` skips them for the core commands)."""
    parser = argparse.ArgumentParser(prog="melo", description="Streaming MELO model-editing daemon.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error (for bug reports)")
    parser.add_argument("--version", action="version", version=f"melo {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", help="TOML settings file (MELO_* environment variables override it)")
        return p

    run = with_config(sub.add_parser("run", help="run the writer daemon"))
    run.add_argument("--until-idle", action="store_true", help="stop once the source is drained and all is published")
    run.set_defaults(func=cmd_run)

    produce = with_config(sub.add_parser("produce", help="send a JSONL file of events to Kafka"))
    produce.add_argument("file")
    produce.add_argument("--topic", help="default: the edits topic from settings")
    produce.set_defaults(func=cmd_produce)

    snaps = with_config(sub.add_parser("snapshots", help="list / show / verify snapshot versions"))
    snaps.add_argument("action", choices=["list", "show", "verify"])
    snaps.add_argument("version", nargs="?", type=int)
    snaps.add_argument("--json", action="store_true", help="show: the whole manifest as JSON")
    snaps.set_defaults(func=cmd_snapshots)

    inspect = with_config(sub.add_parser("inspect", help="inspect the serving version"))
    inspect.add_argument("what", choices=["clusters", "route"])
    inspect.add_argument("prompt", nargs="?", help="for `route`: the prompt to route")
    inspect.add_argument("--limit", type=int, default=20)
    inspect.set_defaults(func=cmd_inspect)

    rollback = with_config(sub.add_parser("rollback", help="publish a new version with an old version's content"))
    rollback.add_argument("--to", type=int, required=True)
    rollback.add_argument("--reason", required=True)
    rollback.set_defaults(func=cmd_rollback)

    retract = with_config(sub.add_parser("retract", help="publish a new version without one edit"))
    retract.add_argument("edit_id")
    retract.add_argument("--reason", required=True)
    retract.set_defaults(func=cmd_retract)
    for steer in (rollback, retract):
        steer.add_argument("--no-wait", action="store_true",
                           help="with a running daemon: only send the control event, do not wait for its outcome")
        steer.add_argument("--wait-s", type=float, default=120.0,
                           help="with a running daemon: how long to wait for the new version (default 120)")

    from daemon.cli_inspect import register as register_inspection

    register_inspection(sub, with_config)

    preset_cli.register_cli(sub)

    # Listed for `melo --help`; main() hands every word after "eval" to the benchmark's own parser.
    evaluate = sub.add_parser("eval", help="quality evaluation (melo_eval/cli.py)", add_help=False)
    evaluate.add_argument("rest", nargs=argparse.REMAINDER)
    evaluate.set_defaults(func=cmd_eval)

    if optional:
        _register_optional(sub)
    return parser


def cmd_eval(args: argparse.Namespace) -> int:
    """Hand the arguments to the quality evaluation, ``melo_eval.cli.main`` (``melo eval --help``).

    The one import up the layers: the command line is where the packages are put together, and
    ``melo_eval`` (which runs the daemon for ``--daemon``) is imported only for this command.
    """
    from melo_eval.cli import main as evaluate

    return int(evaluate(args.rest) or 0)


def _register_optional(sub: Any) -> None:
    """``serve`` (daemon/server.py: importing FastAPI and torch costs seconds, so only when asked)."""
    from daemon import server

    server.register_cli(sub)


def main(argv: list[str] | None = None) -> int:
    """Console entry point."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    words = sys.argv[1:] if argv is None else argv
    command = next((word for word in words if not word.startswith("-")), None)
    if command == "eval":
        # Every word after "eval" is the benchmark's, options included (argparse's REMAINDER would
        # not pass a leading --help through).
        at = words.index("eval")
        args = argparse.Namespace(verbose=any(w in ("-v", "--verbose") for w in words[:at]), rest=words[at + 1:])
        _configure_logging(args.verbose)
        return cmd_eval(args)
    args = build_parser(optional=command not in CORE_COMMANDS).parse_args(argv)
    _configure_logging(args.verbose)
    return run_reporting(args.command, lambda: int(args.func(args) or 0), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
