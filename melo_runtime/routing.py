"""Per-call routing state, carried in a ContextVar instead of a module-level global.

The block LoRA layers, the key hook and the prefix cache are installed in the model once; they hold
no per-request data. Each editor call (generate, classify, score, a training run) builds a
:class:`CallState` and enters :func:`use_state` around the model's forward passes. Every thread (and
asyncio task) sees only its own state, so concurrent calls on one model route independently, and
several editors (say, two snapshot versions) can serve through the same attached model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from melo_runtime.block_lora import BlockFactors

# keys [rows, dim] (on the model's device) -> block id per row (long, -1 = base model)
Router = Callable[[torch.Tensor], torch.Tensor]


class KeysCaptured(Exception):
    """Raised by the key hook to stop a forward pass once the keys are known (nothing above them runs)."""


@dataclass
class PrefixCache:
    """Outputs of the frozen layers below the first LoRA layer, recorded once and replayed.

    Only valid while the model sees the same batch: the trainer creates one per training batch.
    """

    layer_ids: frozenset[int]  # id() of the frozen layer modules this cache covers
    replaying: bool = False
    outputs: dict[int, Any] = field(default_factory=dict)
    rows: torch.Tensor | None = None  # while replaying: the recorded rows this forward runs on (None: all)


@dataclass
class CallState:
    """Everything one call needs the attached modules to know.

    Routing: ``blocks`` holds the block id of every row of the batch (-1 = base model). If it is
    ``None`` when the key module runs, the key hook computes each row's key from ``attention_mask``,
    asks ``router`` and stores the answer here, so later decoding steps reuse it (route once).
    """

    key_module: str
    factors: Mapping[str, BlockFactors] | None = None
    attention_mask: torch.Tensor | None = None
    router: Router | None = None
    blocks: torch.Tensor | None = None
    capture_only: bool = False  # stop the forward right after the key module (see KeysCaptured)
    keys: torch.Tensor | None = None
    # Training: layer -> (A [k, p, d_in], B [k, d_out, p]) of the k blocks being trained, and the
    # index (0..k-1) of the block each row of the batch trains.
    training: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    training_blocks: torch.Tensor | None = None
    prefix: PrefixCache | None = None


_CURRENT: ContextVar[CallState | None] = ContextVar("melo_call_state", default=None)


def current_state() -> CallState | None:
    """The state of the call running in this thread/task, or ``None`` outside any editor call."""
    return _CURRENT.get()


@contextmanager
def use_state(state: CallState) -> Iterator[CallState]:
    """Make ``state`` the current call state for the duration of the ``with`` block."""
    token = _CURRENT.set(state)
    try:
        yield state
    finally:
        _CURRENT.reset(token)
