"""One lock for torch's process-wide random generator.

A seeded construction (a tiny model, a classifier head drawn for new labels, seeded sampling) forks
the global generator and seeds it; any other thread that draws from it meanwhile -- Hugging Face's
``from_pretrained`` initialises modules before it loads their weights, e.g. the sentence encoder a
writer thread loads on its first edit -- changes what the seeded construction gets. Every user of
the global generator in melo holds :data:`GLOBAL_RNG_LOCK` (re-entrant: a seeded section may load).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

GLOBAL_RNG_LOCK = threading.RLock()


@contextmanager
def seeded(seed: int, devices: list[int] | None = None) -> Iterator[None]:
    """Run the body with torch's global generator seeded with ``seed``, under the lock, and restore it after."""
    with GLOBAL_RNG_LOCK, torch.random.fork_rng(devices=devices or []):
        torch.manual_seed(seed)
        yield
