"""Probe the serving version and roll back automatically when it regresses.

Three probe sets, each scored as the share of probes that pass (``melo_monitor_probe_score``):

- ``locality`` -- out-of-scope inputs whose output edits must not change: the edit events'
  ``locality`` probes and canary lines without ``expected``. The reference is always the base
  model's own answer (computed once, when a version first routes the probe to a block, and kept):
  an edit can only break what the base model answers, so a producer's ``expected`` that the base
  model does not give (e.g. a dataset's gold answer) is not a regression signal and is not used.
  A probe that the version routes to no block is answered by the base model by construction
  (ΔW = 0 for that row) and passes without generating; only captured probes are generated and
  compared, which keeps a check over hundreds of probes well under a second on CPU.
  Threshold ``monitor.locality_min``.
- ``edits`` -- a seeded sample of the applied edits that the trainer reported learned and that are
  still reachable in the version: each must still be answered with its target (generate: every
  target token is the teacher-forced argmax; classify: the label). An edit never learned cannot
  regress, so it is not a probe. Threshold ``monitor.edits_min``.
- ``canaries`` -- the user's ``monitor.canary_file`` (JSONL ``{"prompt", "expected"}``): all must
  pass (generate: the output starts with ``expected``; classify: the label equals it).

A check runs on a schedule (APScheduler, every ``monitor.interval_s``) and after every publish
(:meth:`Monitor.after_publish`). Passing versions are marked ``good``. On a breach the version is
marked ``bad`` with the scores in the mark's reason, and with ``monitor.auto_rollback`` the monitor
rolls back to the last good version: the newest older version that is not marked bad and passes the
probes now. The edits first applied after that version are reported as the cause (log, the bad
mark's reason, :class:`CheckOutcome`); the writer that publishes the rollback counts it in
``melo_rollbacks_total{reason="monitor"}`` (``Worker.rollback(..., monitor=True)``).

Outputs are compared one prompt per forward, in the same way for the base and for the version, so
that padding in a batch can never make an unchanged model look changed. ``melo run`` wires the
monitor to its writer (:func:`monitor_for_worker`): the after-publish check runs on the writer's
loop, the scheduled check holds the writer's loop lock, so probes never race a training step.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import uuid
from collections.abc import Callable, Container, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from melo_runtime import MeloConfig, MeloEditor

from daemon import metrics
from daemon.serving_state import ServingState
from daemon.settings import MonitorSettings, Settings
from daemon.snapshots import Manifest
from schemas.events import EditEvent

log = logging.getLogger(__name__)

# Rollback callback: (to_version, reason) -> the new version number (None if only queued). It
# must count melo_rollbacks_total{reason="monitor"} (Worker.rollback(..., monitor=True) does).
Rollback = Callable[[int, str], int | None]


# Locality probes are routed this many at a time (one batched key forward each).
ROUTE_CHUNK = 64


@dataclass(frozen=True)
class Probe:
    """One input and the output it must give (``edit_id`` for probes taken from an applied edit).

    A locality probe's ``expected`` is the base model's answer, ``None`` until first needed.
    """

    prompt: str
    expected: str | None
    edit_id: str | None = None


class ProbeBook:
    """The locality and edit probes of one model, persisted as JSON (temp file + rename).

    Bounded: past ``max_locality`` / ``max_edits`` the oldest probes are dropped, so the check
    stays fast however long the stream runs.
    """

    def __init__(self, path: Path, *, max_locality: int = 512, max_edits: int = 4096) -> None:
        """Read ``path`` if it exists; :meth:`save` writes it."""
        self.path = Path(path)
        self.max_locality = max_locality
        self.max_edits = max_edits
        self.locality: list[Probe] = []
        self.edits: dict[str, Probe] = {}
        if self.path.exists():
            doc = json.loads(self.path.read_text(encoding="utf-8"))
            self.locality = [Probe(**p) for p in doc.get("locality", [])]
            self.edits = {p["edit_id"]: Probe(**p) for p in doc.get("edits", [])}

    def add_edit(self, edit_id: str, prompt: str, target: str) -> None:
        """Remember an applied edit (a re-edit of the same id replaces the old probe)."""
        self.edits.pop(edit_id, None)
        self.edits[edit_id] = Probe(prompt=prompt, expected=target, edit_id=edit_id)
        while len(self.edits) > self.max_edits:
            del self.edits[next(iter(self.edits))]

    def add_locality(self, prompt: str) -> None:
        """Remember an out-of-scope input (ignored if the prompt is known); its base answer comes later."""
        if self.has_locality(prompt):
            return
        self.locality.append(Probe(prompt=prompt, expected=None))
        del self.locality[: max(0, len(self.locality) - self.max_locality)]

    def has_locality(self, prompt: str) -> bool:
        """Whether ``prompt`` already is a locality probe."""
        return any(p.prompt == prompt for p in self.locality)

    def set_base_answer(self, index: int, answer: str) -> None:
        """Record the base model's answer to locality probe ``index``."""
        self.locality[index] = Probe(prompt=self.locality[index].prompt, expected=answer)

    def save(self) -> None:
        """Write the book atomically."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"locality": [asdict(p) for p in self.locality], "edits": [asdict(p) for p in self.edits.values()]}
        temp = self.path.with_suffix(self.path.suffix + ".tmp")
        temp.write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
        os.replace(temp, self.path)


def read_canaries(path: Path) -> tuple[list[Probe], list[str]]:
    """Canary file lines: ``(probes with expected, prompts without expected -> locality probes)``.

    Raises ValueError naming the line that is not a JSON object with a non-empty ``prompt``.
    """
    canaries: list[Probe] = []
    locality: list[str] = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not JSON ({exc.msg}); each line must be {{\"prompt\", \"expected\"}}") from exc
        if not isinstance(doc, dict) or not isinstance(doc.get("prompt"), str) or not doc["prompt"].strip():
            raise ValueError(f"{path}:{number}: needs a non-empty string \"prompt\"")
        expected = doc.get("expected")
        if expected is None:
            locality.append(doc["prompt"])
        else:
            canaries.append(Probe(prompt=doc["prompt"], expected=str(expected)))
    return canaries, locality


@dataclass
class ProbeReport:
    """Scores of one version: share of passing probes per set (``None``: the set is empty)."""

    version: int
    scores: dict[str, float | None]
    failures: dict[str, list[str]] = field(default_factory=dict)  # probe set -> failing prompts (first few)
    breaches: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """No probe set fell below its minimum."""
        return not self.breaches


@dataclass
class CheckOutcome:
    """What one check did."""

    report: ProbeReport
    rolled_back_to: int | None = None
    new_version: int | None = None
    culprit_edit_ids: list[str] = field(default_factory=list)


class Monitor:
    """Runs the probe sets against versions of one model and rolls back on a breach."""

    def __init__(
        self,
        state: ServingState,
        settings: MonitorSettings,
        probes: ProbeBook,
        *,
        rollback: Rollback | None = None,
        max_new_tokens: int = 16,
        edit_sample: int = 64,
        max_candidates: int = 10,
        seed: int = 0,
        lock: threading.RLock | None = None,
    ) -> None:
        """Probe versions loaded through ``state`` (its store, model and base weights).

        ``rollback`` performs a rollback (``ControlOps.rollback`` in a server, ``Worker.rollback``
        in the daemon); without it a breach is marked and reported but nothing is rolled back.
        ``lock`` serialises checks (default: a lock of the monitor's own); the daemon passes the
        writer's loop lock, so that a scheduled check never waits for the loop while holding a lock
        the loop's after-publish check needs.
        """
        self.state = state
        self.settings = settings
        self.probes = probes
        self.rollback = rollback
        self.max_new_tokens = max_new_tokens
        self.edit_sample = edit_sample
        self.max_candidates = max_candidates
        self.seed = seed
        self.canaries: list[Probe] = []
        self._canary_locality: list[str] = []
        if settings.canary_file is not None:
            self.canaries, self._canary_locality = read_canaries(settings.canary_file)
        self._base: MeloEditor | None = None
        self._lock = lock if lock is not None else threading.RLock()

    @property
    def model_name(self) -> str:
        return self.state.model_name

    # ---- recording probes -------------------------------------------------------------------

    def record(self, events: Iterable[EditEvent], learned: Container[str] | None = None) -> None:
        """Add the applied ``events``' locality probes, and as edit probes those in ``learned``
        (``None``: every event was learned)."""
        for event in events:
            if learned is None or event.edit_id in learned:
                self.probes.add_edit(event.edit_id, event.prompt, event.target)
            for probe in event.locality:
                self.probes.add_locality(probe.prompt)
        for prompt in self._canary_locality:
            self.probes.add_locality(prompt)
        self.probes.save()

    def base_editor(self, config: MeloConfig) -> MeloEditor:
        """An editor with no edits (cached): it routes every row to the base model, so its outputs
        are the base's, produced by the same code path (tokenisation, decoding) as every version's."""
        if self._base is None:
            self._base = MeloEditor(self.state.model, self.state.tokenizer, config)
        return self._base

    def _answer(self, editor: MeloEditor, prompt: str, task: str) -> str:
        if task == "classify":
            return editor.classify([prompt])[0]
        return editor.generate([prompt], max_new_tokens=self.max_new_tokens)[0]

    # ---- scoring ----------------------------------------------------------------------------

    def evaluate(self, version: int) -> ProbeReport:
        """Score every probe set on ``version`` (loaded and verified from the store)."""
        loaded = self.state.loaded()
        editor = loaded.editor if loaded is not None and loaded.version == version else self.state.load(version).editor
        task = editor.config.task
        failures: dict[str, list[str]] = {}
        scores: dict[str, float | None] = {}

        def score(name: str, probes: Sequence[Probe], passes: Callable[[Probe], bool]) -> None:
            if not probes:
                scores[name] = None
                return
            failed = [p.prompt for p in probes if not passes(p)]
            scores[name] = 1.0 - len(failed) / len(probes)
            failures[name] = failed[:10]

        captured = self._captured_locality(editor)
        score("locality", self.probes.locality,
              lambda p: p.prompt not in captured or self._answer(editor, p.prompt, task) == captured[p.prompt])
        reachable = editor.edit_ids()
        applied = [p for p in self.probes.edits.values() if p.edit_id in reachable]
        sample = random.Random(self.seed + version).sample(applied, min(self.edit_sample, len(applied)))
        score("edits", sample, lambda p: self._edit_holds(editor, p, task))
        score("canaries", self.canaries, lambda p: self._canary_holds(editor, p, task))

        minimums = {"locality": self.settings.locality_min, "edits": self.settings.edits_min, "canaries": 1.0}
        breaches = [
            f"{name} {value:.3f} < {minimums[name]}"
            for name, value in scores.items()
            if value is not None and value < minimums[name]
        ]
        return ProbeReport(version=version, scores=scores, failures=failures, breaches=breaches)

    def _captured_locality(self, editor: MeloEditor) -> dict[str, str]:
        """Locality probes that ``editor`` routes to a block -> the base model's answer to each."""
        probes = self.probes.locality
        routes = [route for start in range(0, len(probes), ROUTE_CHUNK)
                  for route in editor.route([p.prompt for p in probes[start:start + ROUTE_CHUNK]])]
        captured: dict[str, str] = {}
        answered = False
        for index, (probe, route) in enumerate(zip(probes, routes, strict=True)):
            if route is None:
                continue
            expected = probe.expected
            if expected is None:
                expected = self._answer(self.base_editor(editor.config), probe.prompt, editor.config.task)
                self.probes.set_base_answer(index, expected)
                answered = True
            captured[probe.prompt] = expected
        if answered:
            self.probes.save()
        return captured

    def _edit_holds(self, editor: MeloEditor, probe: Probe, task: str) -> bool:
        if task == "classify":
            return editor.classify([probe.prompt])[0] == probe.expected
        return editor.score([probe.prompt], [probe.expected])[0] >= 1.0

    def _canary_holds(self, editor: MeloEditor, probe: Probe, task: str) -> bool:
        answer = self._answer(editor, probe.prompt, task)
        if task == "classify":
            return answer == probe.expected
        return answer.strip().startswith(probe.expected.strip())

    # ---- checking and rolling back ----------------------------------------------------------

    def after_publish(
        self, manifest: Manifest, events: Iterable[EditEvent] = (), learned: Container[str] | None = None
    ) -> CheckOutcome:
        """Record the probes of a freshly published version's edits, then check that version.

        ``learned``: the edit ids the trainer reported learned (``None``: all of ``events``); the
        signature is :data:`daemon.worker.PublishHook`'s.
        """
        with self._lock:
            self.record(events, learned)
            return self._check(manifest.version)

    def check(self) -> CheckOutcome | None:
        """Check the store's CURRENT version (the scheduled job); ``None`` before the first publish."""
        with self._lock:
            current = self.state.store.current(self.model_name)
            if current is None:
                return None
            if not all(self.probes.has_locality(p) for p in self._canary_locality):
                self.record(())
            return self._check(current)

    def schedule(self, scheduler: Any) -> None:
        """Add the periodic check to an APScheduler 3 scheduler (one run at a time, missed runs merged)."""
        scheduler.add_job(
            self._scheduled_check,
            "interval",
            seconds=self.settings.interval_s,
            id=f"monitor-{self.model_name}",
            max_instances=1,
            coalesce=True,
            replace_existing=True,
        )

    def _scheduled_check(self) -> None:
        try:
            self.check()
        except Exception:  # noqa: BLE001 -- a failing check must not kill the scheduler thread; it is logged
            log.exception("monitor check of %s failed", self.model_name)

    def _check(self, version: int) -> CheckOutcome:
        store = self.state.store
        manifest = store.manifest(self.model_name, version)
        report = self.evaluate(version)
        for name, value in report.scores.items():
            if value is not None:
                metrics.MONITOR_PROBE_SCORE.labels(model=self.model_name, probe_set=name).set(value)
        if report.passed:
            if manifest.status == "new":
                store.mark(self.model_name, version, "good", reason=f"monitor: {_format_scores(report)}")
            return CheckOutcome(report=report)
        if manifest.status != "bad":
            store.mark(self.model_name, version, "bad", reason=f"monitor: {'; '.join(report.breaches)}")
        outcome = CheckOutcome(report=report)
        if not self.settings.auto_rollback or self.rollback is None:
            log.warning("version %d of %s breaches %s; automatic rollback is off", version, self.model_name, report.breaches)
            return outcome
        target = self._last_good(version)
        if target is None:
            log.error("version %d of %s breaches %s and no earlier version passes: not rolled back",
                      version, self.model_name, report.breaches)
            return outcome
        outcome.rolled_back_to = target
        outcome.culprit_edit_ids = self._edits_between(target, version)
        reason = (
            f"monitor: version {version} breached {'; '.join(report.breaches)}; "
            f"edits applied since version {target}: {', '.join(outcome.culprit_edit_ids) or 'none'}"
        )
        log.warning("rolling %s back to version %d: %s", self.model_name, target, reason)
        # The callback counts melo_rollbacks_total{reason="monitor"}: the writer that publishes it.
        outcome.new_version = self.rollback(target, reason[:1000])
        return outcome

    def _last_good(self, bad: int) -> int | None:
        """The newest version older than ``bad``, not marked bad, whose content passes the probes now."""
        store = self.state.store
        older = [m for m in reversed(store.versions(self.model_name)) if m.version < bad and m.status != "bad"]
        for manifest in older[: self.max_candidates]:
            report = self.evaluate(manifest.version)
            if report.passed:
                if manifest.status == "new":
                    store.mark(self.model_name, manifest.version, "good", reason=f"monitor: {_format_scores(report)}")
                return manifest.version
            store.mark(self.model_name, manifest.version, "bad", reason=f"monitor: {'; '.join(report.breaches)}")
        return None

    def _edits_between(self, good: int, bad: int) -> list[str]:
        """Edit ids first applied in versions after ``good`` up to ``bad``: the suspects."""
        suspects: list[str] = []
        for manifest in self.state.store.versions(self.model_name):
            if good < manifest.version <= bad:
                suspects.extend(manifest.edit_ids)
        return list(dict.fromkeys(suspects))


def _format_scores(report: ProbeReport) -> str:
    return ", ".join(f"{name} {value:.3f}" for name, value in report.scores.items() if value is not None) or "no probes"


def monitor_for_worker(worker: Any, settings: Settings) -> Monitor:
    """The writer's monitor: probes on the writer's own backbone, rollbacks through the writer.

    ``melo run`` wires it: ``monitor.schedule(scheduler)`` for the periodic check, and
    ``worker.on_edit_published(monitor.after_publish)`` for the check after each edit version.
    Probes persist in ``<data_dir>/monitor/<model>.probes.json``.
    """
    state = ServingState(worker.snapshots, worker.model, worker.editors.model, worker.editors.tokenizer)
    probes = ProbeBook(Path(settings.data_dir) / "monitor" / f"{settings.model}.probes.json")

    def rollback(to_version: int, reason: str) -> int:
        return int(worker.rollback(to_version, reason, request_id=f"monitor-{uuid.uuid4().hex[:12]}", monitor=True).version)

    return Monitor(state, settings.monitor, probes, rollback=rollback, lock=worker.lock)
