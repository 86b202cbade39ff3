"""Training one block: only block t's factors learn, on the target tokens only, until every row is right.

MELO's recipe (Adam, lr 1e-2, StepLR(20, 0.5), up to 50 iterations) with three changes:
the loss covers only the target tokens (or the label), the frozen layers below the first LoRA layer
run once per batch (:mod:`melo_runtime.prefix_cache`), and training stops as soon as the
teacher-forced argmax reproduces every target of the batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from melo_runtime.block_lora import BlockFactors
from melo_runtime.config import MeloConfig
from melo_runtime.encoding import TeacherForced, loss_and_hits
from melo_runtime.routing import CallState, PrefixCache, use_state


@dataclass
class TrainResult:
    """The trained block and how training went."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer name -> (A [p, d_in], B [d_out, p])
    losses: list[float]  # loss of every forward pass, in order (the last one after the last step)
    learned: list[bool]  # per training row: teacher-forced prediction equals the target
    iterations: int  # optimizer steps taken

    @property
    def final_loss(self) -> float:
        return self.losses[-1]


def train_block(
    model: nn.Module,
    data: TeacherForced,
    factors: Mapping[str, BlockFactors],
    block_id: int,
    config: MeloConfig,
    *,
    key_module: str,
    prefix_layers: Sequence[nn.Module] = (),
    cache_prefix: bool = True,
) -> TrainResult:
    """Train block ``block_id`` of every layer in ``factors`` on ``data``; nothing outside changes.

    ``cache_prefix=False`` recomputes the whole forward pass on every iteration (the official
    behaviour); it exists to check and to benchmark the cache, which gives the same losses.
    """
    trained = {name: layer.init_block(block_id, config.seed) for name, layer in factors.items()}
    parameters = [tensor for pair in trained.values() for tensor in pair]
    optimizer = torch.optim.Adam(parameters, lr=config.lr)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.lr_step, gamma=config.lr_gamma)
    cache = None
    if cache_prefix and prefix_layers:
        cache = PrefixCache(layer_ids=frozenset(id(layer) for layer in prefix_layers))
    state = CallState(key_module=key_module, training=trained, prefix=cache)
    losses: list[float] = []
    steps = 0
    with use_state(state):
        for _ in range(config.iterations):
            loss, learned = _forward(model, data, cache)
            losses.append(float(loss.detach()))
            if config.early_stop and bool(learned.all()):
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            steps += 1
        else:
            with torch.no_grad():
                loss, learned = _forward(model, data, cache)
            losses.append(float(loss))
    return TrainResult(
        factors={name: (a.detach(), b.detach()) for name, (a, b) in trained.items()},
        losses=losses,
        learned=[bool(x) for x in learned.tolist()],
        iterations=steps,
    )


def _forward(model: nn.Module, data: TeacherForced, cache: PrefixCache | None) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(**data.batch.inputs, use_cache=False).logits
    if cache is not None:
        cache.replaying = True  # the first pass recorded the frozen prefix; every later one replays it
    loss, learned, _ = loss_and_hits(logits, data.targets)
    return loss, learned
