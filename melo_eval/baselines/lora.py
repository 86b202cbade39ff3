"""Vanilla LoRA sequential fine-tuning: one LoRA on the target layers, every batch trains it again.

This is the "LoRA" row of the MELO paper's tables: no routing, no blocks, so later batches
overwrite what earlier ones taught (catastrophic forgetting is the point of the comparison) and
every input, in scope or not, sees the adapter.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from melo_eval.baselines.hooked import HookedMethod, linear_shape
from melo_eval.baselines.replay import frozen_prefix, layers_below
from melo_eval.datasets import EditCase


class LoraAdapter(nn.Module):
    """ΔW = B A on one linear layer, added to its output by a forward hook."""

    def __init__(self, module: nn.Module, rank: int, generator: torch.Generator):
        super().__init__()
        d_in, d_out = linear_shape(module)
        # PEFT's init: A kaiming-uniform, B zero, so the adapter starts as the identity edit.
        bound = 1.0 / math.sqrt(d_in)
        self.A = nn.Parameter((torch.rand(rank, d_in, generator=generator) * 2 - 1) * bound)
        self.B = nn.Parameter(torch.zeros(d_out, rank))
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        return output + (inputs[0] @ self.A.T) @ self.B.T


class SequentialLora(HookedMethod):
    """One LoRA of rank ``rank`` on ``target_modules``, fine-tuned on each batch in turn."""

    name = "lora"

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        task: str,
        target_modules: Sequence[str],
        rank: int = 8,
        iterations: int = 50,
        lr: float = 1e-2,
        lr_step: int = 20,
        lr_gamma: float = 0.5,
        seed: int = 0,
        max_length: int = 256,
    ):
        super().__init__(model, tokenizer, task, max_length)
        modules = dict(model.named_modules())
        missing = [name for name in target_modules if name not in modules]
        if missing:
            raise ValueError(f"target modules {missing} not found in the model; check the names")
        generator = torch.Generator().manual_seed(seed)
        self.adapters = nn.ModuleList(LoraAdapter(modules[name], rank, generator) for name in target_modules)
        self.iterations, self.lr, self.lr_step, self.lr_gamma = iterations, lr, lr_step, lr_gamma
        self.frozen = layers_below(model, list(target_modules))

    def apply_batch(self, cases: Sequence[EditCase]) -> dict[str, float]:
        """Fine-tune the single LoRA on this batch (fresh Adam + StepLR, as each MELO block gets)."""
        prompts, targets = [c.prompt for c in cases], [c.target for c in cases]
        optimizer = torch.optim.Adam(self.adapters.parameters(), lr=self.lr)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=self.lr_step, gamma=self.lr_gamma)
        loss = torch.tensor(float("nan"))
        with torch.enable_grad(), frozen_prefix(self.frozen):
            for _ in range(self.iterations):
                loss = self.edit_loss(prompts, targets)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                scheduler.step()
        return {"iterations": self.iterations, "final_loss": float(loss.detach())}
