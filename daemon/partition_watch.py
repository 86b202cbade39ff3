"""A writer that holds the lease but has no partition assigned reads nothing and blocks its model
(a consumer group stuck after a rebalance): export the assignment and warn while it lasts."""

from __future__ import annotations

import logging
import time

from daemon import metrics

log = logging.getLogger("melo.worker")


class PartitionWatch:
    """Fed the assigned partition count on every turn of the loop."""

    def __init__(self, model: str, warn_s: float) -> None:
        self.model = model
        self.warn_s = warn_s
        self._partitionless_since: float | None = None
        self._last_warning = 0.0

    def observe(self, assigned: int) -> None:
        """Export ``assigned``; warn once ``warn_s`` passed with none (then every ``warn_s``)."""
        now = time.monotonic()
        metrics.ASSIGNED_PARTITIONS.labels(model=self.model).set(assigned)
        if assigned:
            self._partitionless_since = None
            metrics.SECONDS_WITHOUT_PARTITIONS.labels(model=self.model).set(0)
            return
        if self._partitionless_since is None:
            self._partitionless_since = self._last_warning = now
        idle = now - self._partitionless_since
        metrics.SECONDS_WITHOUT_PARTITIONS.labels(model=self.model).set(idle)
        if idle >= self.warn_s and now - self._last_warning >= self.warn_s:
            self._last_warning = now
            log.warning(
                "model %s: this writer holds the lease but has had no partition assigned for %.0fs; nothing is being "
                "read. Check the consumer group (kafka-consumer-groups.sh --describe --group <kafka.group_id>) and "
                "restart this process if the group does not assign it a partition", self.model, idle,
            )
