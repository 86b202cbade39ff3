"""Shared fixtures: real Redis and Kafka-protocol servers on loopback, offline Hugging Face, few threads.

Tests under ``tests/integration/`` are marked ``integration`` and tests under ``tests/slow/`` are marked
``slow`` automatically, so ``pytest -m "not slow and not integration"`` runs the unit tests alone.
"""

from __future__ import annotations

import itertools
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

# Set before transformers is imported anywhere: nothing in the test suite may reach a model hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

# `python -m pytest` puts the repository root on sys.path and a bare `pytest` does not; tests import
# `melo_testkit` (service launchers shared with bench/) and `tests.*` helpers either way.
_REPO_ROOT = str(Path(__file__).resolve().parent.parent)
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

import pytest  # noqa: E402
import torch  # noqa: E402

from melo_testkit.services import KafkaBroker, RedisServer  # noqa: E402

# The CI machine's cores are shared; more threads than cores only adds contention.
torch.set_num_threads(2)

_TESTS_DIR = Path(__file__).parent
_names = itertools.count()
_MARK_BY_DIR = {"integration": pytest.mark.integration, "slow": pytest.mark.slow}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test by the folder it lives in (``integration`` / ``slow``)."""
    for item in items:
        try:
            relative = Path(item.path).relative_to(_TESTS_DIR)
        except ValueError:
            continue
        mark = _MARK_BY_DIR.get(relative.parts[0])
        if mark is not None:
            item.add_marker(mark)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh, empty Redis (AOF on) for this test only; stopped by PID and its directory removed."""
    server = RedisServer()
    try:
        yield server.start()
    finally:
        server.close()


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[KafkaBroker]:
    """One Kafka-protocol broker shared by the whole session: use unique topic and group names."""
    broker = KafkaBroker()
    try:
        yield broker.start()
    finally:
        broker.close()


@pytest.fixture
def fresh_kafka_broker() -> Iterator[KafkaBroker]:
    """A Kafka-protocol broker of this test's own, for tests that restart it or need no other topics."""
    broker = KafkaBroker()
    try:
        yield broker.start()
    finally:
        broker.close()


@pytest.fixture
def unique_name(request: pytest.FixtureRequest) -> Callable[[str], str]:
    """A factory of names unique in the session, e.g. ``unique_name("edits")`` → ``edits-test_x-3``.

    Use it for topics, consumer groups and Redis key prefixes on the shared broker.
    """
    test = re.sub(r"[^A-Za-z0-9_.-]", "-", request.node.name)[:80]
    return lambda prefix: f"{prefix}-{test}-{os.getpid()}-{next(_names)}"
