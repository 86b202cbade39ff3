"""Record the frozen layers below the first edited layer once, replay them on later iterations.

Training a baseline changes nothing below the first layer it edits, so recomputing those layers
on every iteration only burns CPU. Inside :func:`frozen_prefix` the first forward records each
frozen layer's output and later forwards return the recording; outside it the model is untouched.
Results are identical to full recomputation (the same tensors), only faster.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

_LAYER = re.compile(r"^(?P<stack>.+\.(?:layers|h|layer|block))\.(?P<index>\d+)(?:\.|$)")


def layers_below(model: nn.Module, module_names: list[str]) -> list[nn.Module]:
    """The transformer layers strictly below the lowest of ``module_names`` (same layer stack)."""
    located = [(m.group("stack"), int(m.group("index"))) for m in map(_LAYER.match, module_names) if m]
    if not located:
        return []
    stack, lowest = min(located, key=lambda item: item[1])
    layers = model.get_submodule(stack)
    return [layers[i] for i in range(lowest)]


@contextmanager
def frozen_prefix(layers: list[nn.Module]) -> Iterator[None]:
    """Within the block, each layer in ``layers`` runs once and then replays its first output."""
    recorded: dict[int, object] = {}

    def replaying(layer: nn.Module):
        original = layer.forward

        def forward(*args, **kwargs):
            if id(layer) not in recorded:
                recorded[id(layer)] = original(*args, **kwargs)
            return recorded[id(layer)]

        return forward

    for layer in layers:
        layer.forward = replaying(layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward  # drop the instance attribute: the class's forward is back
