"""Run the frozen layers below the first LoRA layer once per training batch, then replay them.

Training block t changes nothing below the first LoRA layer, so recomputing those layers on every
iteration (as the official code does) is wasted work. Each frozen layer's ``forward`` is wrapped once,
at attach time, by :func:`install_prefix_replay`. The wrapper is inert unless the current call carries
a :class:`~melo_runtime.routing.PrefixCache` naming the layer: then the first pass records the
layer's output and later passes return the recording without running the layer. Module names and
structure never change, so concurrent inference on the same model is unaffected. A replay may run on
a subset of the recorded rows (the trainer drops rows already learned): it returns those rows only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from melo_runtime.routing import current_state

_ORIGINAL = "_melo_original_forward"


def install_prefix_replay(layer: nn.Module) -> None:
    """Wrap ``layer.forward`` so it can record/replay its output (idempotent)."""
    if _ORIGINAL in layer.__dict__:
        return
    original = layer.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        state = current_state()
        cache = state.prefix if state is not None else None
        if cache is None or id(layer) not in cache.layer_ids:
            return original(*args, **kwargs)
        if cache.replaying:
            return _rows(cache.outputs[id(layer)], cache.rows)
        output = original(*args, **kwargs)
        cache.outputs[id(layer)] = output
        return output

    # An instance attribute shadows the class's forward; nn.Module.__call__ looks it up per call.
    setattr(layer, _ORIGINAL, original)
    layer.forward = forward


def _rows(output: Any, rows: torch.Tensor | None) -> Any:
    """The recorded output restricted to ``rows`` of the recorded batch (tensors with a batch axis)."""
    if rows is None:
        return output
    if isinstance(output, torch.Tensor):
        return output.index_select(0, rows) if output.dim() > 0 and output.shape[0] > 1 else output
    if isinstance(output, (tuple, list)):
        return type(output)(_rows(item, rows) for item in output)
    return output
