"""Background jobs of the writer (APScheduler 3 ``BackgroundScheduler``, its own thread pool).

- ``flush``: a partial batch whose oldest edit waited ``batch.max_wait_s`` is trained at the next
  turn of the loop (the loop also checks this itself; the job covers a loop blocked in ``poll``).
- ``lease``: renew the writer lease every ``redis.lease_renew_s`` (local store: a third of its
  5 s lease); a refused renewal stops the loop.
- ``retention``: delete old snapshot versions (under the loop's lock, so no publish races it).
- ``metrics``: refresh gauges from the editor's stats.

Every job coalesces missed runs and never overlaps itself: a slow job is skipped, not stacked.
"""

from __future__ import annotations

from apscheduler.schedulers.background import BackgroundScheduler

from daemon.settings import Settings
from daemon.worker import Worker

METRICS_REFRESH_S = 15.0


def start_scheduler(worker: Worker, settings: Settings) -> BackgroundScheduler:
    """Start the jobs above for ``worker``; the caller shuts the scheduler down (``shutdown(wait=False)``)."""
    scheduler = BackgroundScheduler(daemon=True, job_defaults={"coalesce": True, "max_instances": 1})
    scheduler.add_job(worker.request_flush, "interval", seconds=max(settings.batch.max_wait_s / 2, 0.2), id="flush")
    scheduler.add_job(worker.renew_lease, "interval", seconds=worker.options.lease_renew_s, id="lease")
    scheduler.add_job(
        worker.retain,
        "interval",
        seconds=settings.retention.interval_s,
        args=[settings.retention.keep_last, settings.retention.keep_statuses()],
        id="retention",
    )
    scheduler.add_job(worker.refresh_metrics, "interval", seconds=METRICS_REFRESH_S, id="metrics")
    scheduler.start()
    return scheduler
