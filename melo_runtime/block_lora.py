"""Block LoRA: per-block low-rank factors and the layer that applies the right block to each row.

A target linear map W (d_in -> d_out) gets, for block b, factors A_b (p x d_in) and B_b (d_out x p).
Row i of a batch routed to block b computes ``W x + B_b A_b x``; a row routed nowhere computes
``W x`` exactly (the base output tensor is returned untouched for it). The factors live outside the
model, in :class:`BlockFactors` owned by an editor, and reach the layer through the per-call
:class:`~melo_runtime.routing.CallState`.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from melo_runtime.routing import current_state


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """``(d_in, d_out)`` of an ``nn.Linear`` or transformers ``Conv1D`` (whose weight is d_in x d_out)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        d_in, d_out = module.weight.shape
        return d_in, d_out
    raise TypeError(
        f"block LoRA wraps nn.Linear or transformers Conv1D, got {type(module).__name__}; "
        "pick target_modules that are linear layers"
    )


class BlockFactors:
    """The growable stack of blocks of one target layer: A [n, p, d_in] and B [n, d_out, p].

    Storage grows by doubling, so appending a block is amortised O(block size). Readers index only
    blocks below :attr:`count`; a block is written before ``count`` moves past it, and storage is
    replaced (never resized in place), so a concurrent reader always sees consistent tensors.
    """

    def __init__(self, d_in: int, d_out: int, rank: int, device: torch.device) -> None:
        self.d_in, self.d_out, self.rank = d_in, d_out, rank
        self._a = torch.zeros(0, rank, d_in, device=device)
        self._b = torch.zeros(0, d_out, rank, device=device)
        self.count = 0

    @property
    def a(self) -> torch.Tensor:
        """A factors of every block, [count, p, d_in]."""
        return self._a[: self.count]

    @property
    def b(self) -> torch.Tensor:
        """B factors of every block, [count, d_out, p]."""
        return self._b[: self.count]

    def append(self, a: torch.Tensor, b: torch.Tensor) -> int:
        """Add one block (A [p, d_in], B [d_out, p]); returns its block id."""
        if a.shape != (self.rank, self.d_in) or b.shape != (self.d_out, self.rank):
            raise ValueError(
                f"block factors of shape {tuple(a.shape)}, {tuple(b.shape)} do not fit a layer with "
                f"rank {self.rank}, d_in {self.d_in}, d_out {self.d_out}"
            )
        if self.count == self._a.shape[0]:
            capacity = max(4, 2 * self.count)
            grown_a = torch.zeros(capacity, self.rank, self.d_in, device=self._a.device)
            grown_b = torch.zeros(capacity, self.d_out, self.rank, device=self._b.device)
            grown_a[: self.count] = self._a[: self.count]
            grown_b[: self.count] = self._b[: self.count]
            self._a, self._b = grown_a, grown_b
        self._a[self.count] = a.detach().to(self._a.device, torch.float32)
        self._b[self.count] = b.detach().to(self._b.device, torch.float32)
        self.count += 1
        return self.count - 1

    def truncate(self, count: int) -> None:
        """Forget blocks ``count`` and above (undo of a failed batch)."""
        self.count = min(self.count, count)

    def init_block(self, block_id: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Fresh trainable factors for ``block_id``: A uniform in +-1/sqrt(d_in) (LoRA's init), B zero.

        The seed depends on the block id so that a rebuilt editor trains identical blocks.
        """
        generator = torch.Generator().manual_seed(seed * 1_000_003 + block_id)
        bound = 1.0 / math.sqrt(self.d_in)
        a = (torch.rand(self.rank, self.d_in, generator=generator) * 2 - 1) * bound
        b = torch.zeros(self.d_out, self.rank)
        device = self._a.device
        return a.to(device).requires_grad_(True), b.to(device).requires_grad_(True)


class BlockLoRALayer(nn.Module):
    """Wraps a linear layer; adds the current call's block LoRA delta to the rows that have a block.

    Per row the cost is O(p): the row's own A_b, B_b are gathered, however many blocks exist.
    """

    def __init__(self, name: str, base: nn.Module) -> None:
        super().__init__()
        self.name = name
        self.base = base
        self.d_in, self.d_out = linear_dims(base)

    # Some models read their linears' parameters directly (T5 casts to ``wo.weight.dtype``).
    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        state = current_state()
        if state is None:
            return out
        if state.training is not None:
            if self.name not in state.training:
                return out
            a, b = state.training[self.name]
            index = state.training_blocks
            a, b = a.index_select(0, index), b.index_select(0, index)  # each row's own block
            x3 = x.view(index.shape[0], -1, x.shape[-1]) if x.dim() == 2 else x  # OPT: [batch * seq, features]
            hidden = torch.bmm(x3.to(a.dtype), a.transpose(1, 2))  # [rows, seq, p]
            return out + torch.bmm(hidden, b.transpose(1, 2)).to(out.dtype).view(out.shape)
        if state.blocks is None or state.factors is None or self.name not in state.factors:
            return out
        return self._add_routed_delta(x, out, state.blocks, state.factors[self.name])

    def _add_routed_delta(
        self, x: torch.Tensor, out: torch.Tensor, blocks: torch.Tensor, factors: BlockFactors
    ) -> torch.Tensor:
        if x.dim() == 2 and blocks.shape[0] > 0 and x.shape[0] % blocks.shape[0] == 0:
            # OPT flattens [batch, seq, features] to [batch * seq, features] around its MLP.
            rows = blocks.shape[0]
            x3, out3 = x.view(rows, -1, x.shape[-1]), out.view(rows, -1, out.shape[-1])
            return self._add_routed_delta(x3, out3, blocks, factors).view(out.shape)
        if x.dim() != 3 or x.shape[0] != blocks.shape[0]:
            raise RuntimeError(
                f"{self.name}: input of shape {tuple(x.shape)} does not match {blocks.shape[0]} routed rows; "
                "block LoRA needs [batch, seq, features] inputs"
            )
        rows = torch.nonzero(blocks >= 0).squeeze(1)
        if rows.numel() == 0:
            return out
        ids = blocks[rows]
        a = factors.a[ids]  # [rows, p, d_in]
        b = factors.b[ids]  # [rows, d_out, p]
        hidden = torch.bmm(x[rows].to(a.dtype), a.transpose(1, 2))  # [rows, seq, p]
        delta = torch.bmm(hidden, b.transpose(1, 2)).to(out.dtype)  # [rows, seq, d_out]
        return out.index_add(0, rows, delta)
