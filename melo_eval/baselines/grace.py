"""GRACE (Hartvigsen et al., NeurIPS 2023): a discrete key-value codebook wrapped around one layer.

Faithful to the official ``GRACEAdapter`` (github.com/Thartvigsen/GRACE, grace/editors/grace.py)
with its default config (``grace.yaml``): Euclidean distance, cold value init (uniform [0, 1)),
``replace_prompt`` replacement, ``coverage`` epsilon expansion, Adam lr 1.0 for 100 iterations per
edit, edits applied one at a time. Keys are the wrapped layer's *input* at the last prompt token;
values replace the layer's *output* at the prompt positions before it when the query falls within
the nearest key's deferral radius epsilon.

Two deliberate differences, both fixes of bugs the MELO design also fixes:
  * labels compare by normalized target text (the official code compares the mean of the label
    token ids, so different answers with equal means "match");
  * routing is per row of a batch (the official code evaluates batch size 1 only).
When a micro-batch of k edits arrives, GRACE applies them one after the other (it has no batch
edit); the harness still evaluates at the same checkpoints as the other methods.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from melo_eval.baselines.hooked import HookedMethod, linear_shape
from melo_eval.baselines.replay import frozen_prefix, layers_below
from melo_eval.datasets import EditCase


def normalize_label(text: str) -> str:
    """The label identity GRACE compares: NFC, trimmed, case-folded."""
    return unicodedata.normalize("NFC", text).strip().casefold()


class GraceCodebook(HookedMethod):
    """GRACE on the linear layer ``layer``, deferral radius ``eps`` for new keys."""

    name = "grace"

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        task: str,
        layer: str,
        eps: float = 1.0,
        iterations: int = 100,
        lr: float = 1.0,
        seed: int = 0,
        max_length: int = 256,
    ):
        super().__init__(model, tokenizer, task, max_length)
        modules = dict(model.named_modules())
        if layer not in modules:
            raise ValueError(f"GRACE layer {layer!r} not found in the model; check the name")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.layer = layer
        self.d_in, self.d_out = linear_shape(modules[layer])
        self.eps, self.iterations, self.lr = eps, iterations, lr
        self.generator = torch.Generator().manual_seed(seed)
        self.keys = torch.empty(0, self.d_in)
        self.values: list[nn.Parameter] = []
        self.epsilons: list[float] = []
        self.key_labels: list[str] = []
        self.conflicts = 0
        self._key_positions: Tensor | None = None
        self._prefill = False
        self._captured: Tensor | None = None
        modules[layer].register_forward_hook(self._hook)
        self.frozen = layers_below(model, [layer])

    @contextmanager
    def routing(self, key_positions: Tensor, prefill: bool) -> Iterator[None]:
        """Tell the hook where each row's key token is for the duration of one forward."""
        self._key_positions, self._prefill = key_positions, prefill
        try:
            yield
        finally:
            self._key_positions, self._prefill = None, False

    def _hook(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        if self._key_positions is None or not self._prefill:
            # Decode steps see one new token: GRACE's replace_prompt then replaces nothing.
            return output
        hidden = inputs[0]  # (B, T, d_in)
        rows = torch.arange(hidden.shape[0])
        query = hidden[rows, self._key_positions].detach()  # (B, d_in)
        self._captured = query
        if not self.values:
            return output
        distances = torch.cdist(query, self.keys)  # (B, K)
        smallest, nearest = distances.min(-1)
        hit = smallest <= torch.tensor(self.epsilons)[nearest]  # (B,)
        chosen = torch.stack(list(self.values))[nearest]  # (B, d_out)
        positions = torch.arange(hidden.shape[1])
        replace = hit[:, None] & (positions[None, :] < self._key_positions[:, None])  # (B, T)
        return torch.where(replace[..., None], chosen[:, None, :].to(output.dtype), output)

    def _query(self, prompt: str, target: str) -> Tensor:
        with torch.no_grad():
            self.edit_loss([prompt], [target])
        if self._captured is None:
            raise RuntimeError("the GRACE hook did not run; is the layer on the forward path?")
        return self._captured[0]

    def calibrate_eps(self, prompts: Sequence[str], fraction: float = 0.25) -> float:
        """Set ``eps`` to ``fraction`` x the median distance between keys of unrelated ``prompts``.

        GRACE tunes epsilon per task; this puts it on the scale of the wrapped layer's keys, the
        same rule melo_runtime uses for R_init. Pass development prompts (never reserved data).
        """
        if len(prompts) < 2:
            raise ValueError(f"need at least 2 prompts to calibrate eps, got {len(prompts)}")
        # The key is read from the prompt alone; the target only has to be valid for the task.
        target = self.model.config.id2label[0] if self.task == "classify" else " x"
        keys = torch.stack([self._query(p, target) for p in prompts])
        distances = torch.cdist(keys, keys)
        off_diagonal = distances[~torch.eye(len(keys), dtype=torch.bool)]
        self.eps = float(off_diagonal.median()) * fraction
        return self.eps

    def _new_value(self) -> nn.Parameter:
        return nn.Parameter(torch.rand(self.d_out, generator=self.generator))

    def _update_codebook(self, query: Tensor, label: str) -> None:
        """GRACE's add / expand / split-on-conflict rule for one new key."""
        if not self.values:
            self._add(query, label)
            return
        distances = torch.cdist(query[None], self.keys)[0]
        smallest, nearest = (float(v) for v in distances.min(0))
        nearest = int(nearest)
        if smallest > self.eps + self.epsilons[nearest]:
            self._add(query, label)
        elif self.key_labels[nearest] != label:
            self._add(query, label)
            self.epsilons[nearest] = smallest / 2 - 1e-5
            self.epsilons[-1] = smallest / 2
            self.conflicts += 1
        elif smallest > self.epsilons[nearest]:
            self.epsilons[nearest] = smallest  # "coverage" expansion

    def _add(self, query: Tensor, label: str) -> None:
        self.keys = torch.cat([self.keys, query[None]])
        self.values.append(self._new_value())
        self.epsilons.append(self.eps)
        self.key_labels.append(label)

    def apply_batch(self, cases: Sequence[EditCase]) -> dict[str, float]:
        """Apply each edit in turn: update the codebook, then train the value its query selects."""
        loss = torch.tensor(float("nan"))
        for case in cases:
            query = self._query(case.prompt, case.target)
            self._update_codebook(query, normalize_label(case.target))
            distances = torch.cdist(query[None], self.keys)[0]
            value = self.values[int(distances.argmin())]
            optimizer = torch.optim.Adam([value], lr=self.lr)
            with torch.enable_grad(), frozen_prefix(self.frozen):
                value.requires_grad_(True)
                for _ in range(self.iterations):
                    loss = self.edit_loss([case.prompt], [case.target])
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
            value.requires_grad_(False)
        return {"iterations": self.iterations * len(cases), "final_loss": float(loss.detach())}

    def stats(self) -> dict[str, int]:
        """Keys play the role of clusters; GRACE never deletes a key, so nothing is forgotten."""
        return {"clusters": len(self.values), "conflicts": self.conflicts, "forgotten": 0}
