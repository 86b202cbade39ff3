"""Training the blocks of one batch: only new block factors learn, on the target tokens only, until
every row is right or a bounded budget is spent.

MELO's recipe (Adam, lr 1e-2, StepLR(20, 0.5), 50 iterations) with these changes:

- **Capacity follows the batch.** At most ``edits_per_block`` edits share one block, so a batch of n
  edits trains ceil(n / edits_per_block) blocks at once, in one batched forward where every row
  gathers its own block (the parameters per edit stay those of the preset, whatever the batch size).
- **Per-block early exit.** Once the teacher-forced argmax reproduces the target of every row of a
  block, the block's rows leave the batch and the block stops moving (its Adam momentum is zeroed),
  so what it learned stays learned; a batch of single-edit blocks (every retry) exits row by row.
- **Iterations extend while the rows still improve** (more target tokens right, a lower loss or a
  smaller margin gap to the best wrong token), up to ``max_iterations``.
- **Retry blocks.** Edits still not learned are trained again from scratch, each in a fresh block
  of its own (a new optimizer; a schedule that decays more slowly each round), up to
  ``retry_rounds`` times, within the same batch. A retry replaces an edit's earlier block only if
  it keeps the rows that decide "learned" learned (an extra row, such as a chat form, that failed
  never costs an edit it had).
- **Cheap steps.** The frozen layers below the first LoRA layer run once per batch
  (:mod:`melo_runtime.prefix_cache`); a causal LM projects to its vocabulary only the hidden states
  of the target positions, gathered before the output layer, and runs its top layer's MLP on those
  positions only.

"Learned" is exact teacher-forced agreement on every target token, EOS included; by induction over
the decoded positions that is what greedy decoding from the prompt produces (for classifiers: the
label is the argmax).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from melo_runtime.block_lora import BlockFactors
from melo_runtime.config import MeloConfig
from melo_runtime.encoding import IGNORE, TeacherForced
from melo_runtime.routing import CallState, PrefixCache, use_state

# Past ``iterations``, a fresh window of ``lr_step`` iterations is granted only if the rows still
# training got more target tokens right, or their loss or their margin gap fell by at least this
# fraction, in the last one.
_MIN_WINDOW_GAIN = 0.01

Block = dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer name -> (A [p, d_in], B [d_out, p])


@dataclass
class TrainResult:
    """The trained blocks, which block holds each row, and how training went."""

    blocks: list[Block]  # in training order; block i gets id ``first block id + i`` unless dropped
    row_blocks: list[int]  # per training row: index in ``blocks`` of the block that last trained it
    learned: list[bool]  # per training row: teacher-forced prediction equals the target
    row_losses: list[float]  # per training row: its loss after training
    losses: list[float] = field(default_factory=list)  # loss of every training forward, in order
    iterations: int = 0  # optimizer steps taken, every round together
    rounds: int = 0  # training rounds run (1 + retry rounds used)

    @property
    def final_loss(self) -> float:
        """Mean of the per-row losses after training."""
        return sum(self.row_losses) / max(len(self.row_losses), 1)

    def compact(self, rows: Sequence[int], first_id: int) -> tuple[list[Block], dict[int, int]]:
        """The blocks that hold at least one of ``rows``, in order, and each of those rows' block id
        once they are numbered from ``first_id`` (blocks holding none of them are dropped)."""
        used = sorted({self.row_blocks[row] for row in rows})
        ids = {index: first_id + position for position, index in enumerate(used)}
        return [self.blocks[index] for index in used], {row: ids[self.row_blocks[row]] for row in rows}

    def group_losses(self, groups: Sequence[str]) -> dict[str, float]:
        """Per group (edit) of rows, the largest final row loss."""
        worst: dict[str, float] = {}
        for group, loss in zip(groups, self.row_losses, strict=True):
            worst[group] = max(worst.get(group, -math.inf), loss)
        return worst


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
    scored_only: bool = True,
    groups: Sequence[int] | None = None,
    required: Sequence[bool] | None = None,
) -> TrainResult:
    """Train new blocks (ids from ``block_id`` on) of every layer in ``factors`` on ``data``.

    ``groups`` gives each row's edit (rows of one edit always share a block); by default every row
    is its own edit; ``required`` marks the rows that decide whether an edit is learned (default:
    all). A retry block replaces an edit's earlier block only if it keeps every required row
    learned. Nothing outside the returned blocks changes. ``cache_prefix=False`` recomputes
    the whole forward pass on every iteration (the official behaviour), and ``scored_only=False``
    projects every kept column to the vocabulary instead of the scored positions only, both for
    checks and benchmarks.
    """
    rows = data.targets.shape[0]
    groups = list(range(rows)) if groups is None else list(groups)
    required = [True] * rows if required is None else list(required)
    if len(groups) != rows or len(required) != rows:
        raise ValueError(f"groups / required have {len(groups)} / {len(required)} entries for {rows} training rows")
    cache = None
    if cache_prefix and prefix_layers:
        cache = PrefixCache(layer_ids=frozenset(id(layer) for layer in prefix_layers))
    step = _Stepper(model, data, cache, key_module, scored_only, lora_modules=list(factors))
    result = TrainResult(blocks=[], row_blocks=[-1] * rows, learned=[False] * rows, row_losses=[math.inf] * rows)
    pending = list(range(rows))
    per_block = config.edits_per_block
    # Without early stop (the official loop, for benchmarks) a round is exactly ``iterations`` steps, once.
    for round_ in range(1 + config.retry_rounds if config.early_stop else 1):
        if not pending:
            break
        assignment = _assign(pending, groups, per_block)
        count = max(assignment.values()) + 1
        first = block_id + len(result.blocks)
        trained = {name: _init_blocks(layer, first, count, config.seed) for name, layer in factors.items()}
        # A retry decays its learning rate more slowly (gamma ** 1/(r+1)): the hard edits need more steps.
        gamma = config.lr_gamma ** (1.0 / (round_ + 1))
        learned, losses = _fit(step, pending, assignment, trained, config, result, gamma)
        kept = _kept_groups(pending, groups, required, result.learned, learned)
        for row in pending:
            if groups[row] in kept:
                continue
            result.row_blocks[row] = len(result.blocks) + assignment[row]
            result.learned[row] = learned[row]
            result.row_losses[row] = losses[row]
        result.blocks.extend(
            {name: (a[i].detach(), b[i].detach()) for name, (a, b) in trained.items()} for i in range(count)
        )
        result.rounds = round_ + 1
        failed = {groups[row] for row in pending if not result.learned[row]}
        pending = [row for row in range(rows) if groups[row] in failed]
        per_block = 1  # a retry gives every edit still failing a block of its own
    return result


def _kept_groups(
    rows: list[int], groups: list[int], required: list[bool], before: list[bool], now: Mapping[int, bool]
) -> set[int]:
    """Edits whose earlier block keeps them: all their required rows were learned before this
    round and are not all learned now (a retry for an extra row never unlearns an edit)."""
    members: dict[int, list[int]] = {}
    for row in rows:
        if required[row]:
            members.setdefault(groups[row], []).append(row)
    return {
        group for group, own in members.items()
        if all(before[row] for row in own) and not all(now[row] for row in own)
    }


def _assign(rows: list[int], groups: list[int], per_block: int) -> dict[int, int]:
    """Row -> block index: edits in order of first appearance, ``per_block`` edits per block."""
    order: dict[int, int] = {}
    for row in rows:
        order.setdefault(groups[row], len(order))
    return {row: order[groups[row]] // per_block for row in rows}


def _init_blocks(layer: BlockFactors, first: int, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [layer.init_block(first + i, seed) for i in range(count)]
    a = torch.stack([a for a, _ in pairs]).detach().requires_grad_(True)  # [count, p, d_in]
    b = torch.stack([b for _, b in pairs]).detach().requires_grad_(True)  # [count, d_out, p]
    return a, b


def _fit(
    step: _Stepper,
    rows: list[int],
    assignment: dict[int, int],
    trained: dict[str, tuple[torch.Tensor, torch.Tensor]],
    config: MeloConfig,
    result: TrainResult,
    gamma: float,
) -> tuple[dict[int, bool], dict[int, float]]:
    """One round: Adam on ``trained`` over ``rows`` with per-block early exit and a progress-driven budget."""
    parameters = [tensor for pair in trained.values() for tensor in pair]
    optimizer = torch.optim.Adam(parameters, lr=config.lr)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.lr_step, gamma=gamma)
    everyone = torch.tensor(rows, dtype=torch.long)
    block_of = torch.tensor([assignment[row] for row in rows], dtype=torch.long)
    count = int(block_of.max()) + 1
    active = torch.arange(len(rows))  # positions in ``rows`` still training
    limit = max(config.max_iterations, config.iterations) if config.early_stop else config.iterations
    window: _Progress | None = None  # the active rows' progress when the window began
    settle = _Margin(config, count)
    iterations = 0
    while True:
        row_loss, hits, right, gap = step.forward(everyone[active], block_of[active], trained)
        result.losses.append(float(row_loss.detach().mean()))
        done = settle.done(hits, row_loss, block_of[active], iterations)
        if config.early_stop and bool(done.all()):
            if active.numel() == len(rows):
                break
            row_loss, hits = _recheck(step, everyone, block_of, trained)
            active = torch.nonzero(~settle.done(hits, row_loss, block_of, iterations)).squeeze(1)
            if active.numel() == 0:
                active = torch.arange(len(rows))  # every row learned, and ``row_loss`` covers them all
                break
            window = None  # other rows now: restart the progress window
            continue
        now = _Progress(float(row_loss.detach().mean()), int(right.sum()), float(gap.sum()))
        if iterations >= limit:
            break
        if iterations % config.lr_step == 0:
            if iterations >= config.iterations and window is not None and not _progressed(window, now):
                break
            window = now
        keep = torch.ones_like(active, dtype=torch.bool)
        if config.early_stop:
            keep = _unfinished(block_of[active], done.cpu(), count)
        # Mean over the target tokens of the rows still training, as the official loop's loss is.
        tokens = step.tokens[everyone[active[keep]]]
        loss = (row_loss[keep.to(row_loss.device)] * tokens).sum() / tokens.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        _hold_still(optimizer, block_of[active[keep]], count)
        optimizer.step()
        if iterations < config.iterations:
            schedule.step()  # the official schedule; extension steps keep its last learning rate
        iterations += 1
        if not bool(keep.all()):
            active = active[keep]  # the rows of finished blocks leave the batch
            window = None
    result.iterations += iterations
    if active.numel() != len(rows):  # the last forward saw only some rows: check them all
        with torch.no_grad():
            row_loss, hits, _, _ = step.forward(everyone, block_of, trained)
    learned = {row: bool(hit) for row, hit in zip(rows, hits.tolist(), strict=True)}
    losses = {row: float(value) for row, value in zip(rows, row_loss.tolist(), strict=True)}
    return learned, losses


class _Margin:
    """Which rows may leave training. Without ``margin_loss``: a row whose target is reproduced. With
    it: a right row also needs its loss <= ``margin_loss``, unless ``lr_step`` iterations have passed
    since its block was first all right (a bounded consolidation: on a model whose logits are capped,
    a tiny random one, the margin is out of reach and must not hold the block hostage)."""

    def __init__(self, config: MeloConfig, count: int) -> None:
        self.margin = config.margin_loss
        self.patience = config.lr_step
        self.right_since = torch.full((count,), -1, dtype=torch.long)  # per block; -1: not all right yet
        self.count = count

    def done(self, hits: torch.Tensor, row_loss: torch.Tensor, blocks: torch.Tensor, iteration: int) -> torch.Tensor:
        if self.margin <= 0:
            return hits
        hits = hits.cpu()
        all_right = ~_unfinished(blocks, hits, self.count)
        fresh = blocks[all_right & (self.right_since[blocks] < 0)]
        self.right_since[fresh] = iteration
        settled = all_right & (iteration - self.right_since[blocks] >= self.patience)
        return hits & ((row_loss.detach().cpu() <= self.margin) | settled)


def _unfinished(blocks: torch.Tensor, hits: torch.Tensor, count: int) -> torch.Tensor:
    """Per row: whether some row of its block (of ``count``) is still wrong. The rows of a block keep
    training together until every one of them is right: a right row that left its block while the
    others still trained it would be pulled off its target unseen."""
    wrong = torch.zeros(count, dtype=torch.long).index_add_(0, blocks, (~hits).long())
    return wrong[blocks] > 0


def _hold_still(optimizer: torch.optim.Adam, training: torch.Tensor, count: int) -> None:
    """Zero Adam's momentum of every block none of whose rows is still training, so that the next
    step leaves it where it is: without this a block whose rows were all learned keeps drifting
    along its momentum for a dozen steps and can unlearn them while nobody looks."""
    idle = torch.ones(count, dtype=torch.bool)
    idle[training] = False
    if not bool(idle.any()):
        return
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            state = optimizer.state.get(parameter)
            if state and "exp_avg" in state:
                state["exp_avg"][idle.to(parameter.device)] = 0


@dataclass(frozen=True)
class _Progress:
    """How far the rows still training are from their targets."""

    loss: float  # mean row loss
    right: int  # target tokens predicted right
    gap: float  # sum over wrong target tokens of (best other logit - target logit)


def _progressed(start: _Progress, now: _Progress) -> bool:
    """Whether the rows still training got better over a window: more target tokens right, or a loss
    or a margin gap at least ``_MIN_WINDOW_GAIN`` lower.

    The gap is the scale-free measure: where the logits are capped (a tiny random model's final norm
    and 0.02-scale output weights keep them within about +-1), the loss sits near log(vocabulary)
    and moves by less than 1% while the wrong tokens still close in on their targets.
    """
    gain = 1 - _MIN_WINDOW_GAIN
    return now.right > start.right or now.loss < gain * start.loss or now.gap < gain * start.gap


def _recheck(step: _Stepper, everyone: torch.Tensor, block_of: torch.Tensor, trained) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and "learned" of every row again. The blocks of rows that left hold still, but a row can
    come out of a differently composed batch on the other side of a rounding-error margin."""
    with torch.no_grad():
        row_loss, hits, _, _ = step.forward(everyone, block_of, trained)
    return row_loss, hits


class _Stepper:
    """Forward passes over any subset of the batch's rows, each row through its own new block."""

    def __init__(
        self,
        model: nn.Module,
        data: TeacherForced,
        cache: PrefixCache | None,
        key_module: str,
        scored_only: bool = True,
        lora_modules: Sequence[str] = (),
    ) -> None:
        self.model = model
        self.data = data
        self.cache = cache
        self.key_module = key_module
        self.keep = _logits_to_keep(model, data)
        targets = data.targets if data.targets.dim() == 2 else data.targets.unsqueeze(1)
        self.tokens = (targets != IGNORE).sum(-1).clamp(min=1).float()  # scored tokens per row
        # A causal LM's vocabulary projection dominates a step (SmolLM2: 576 x 49,152 per position
        # against ~3.6M multiply-adds per position in a layer): project the scored positions only.
        self.head = model.get_output_embeddings() if scored_only and self.keep else None
        # The top layer's MLP output reaches nothing but the final norm and the output layer, position
        # by position: it runs at the scored positions only, once the first pass showed that it maps
        # a [rows, columns, hidden] tensor to one of the same shape.
        self.top_mlp = _top_mlp(model, lora_modules) if self.head is not None else None
        self.top_mlp_plain: bool | None = None

    def forward(
        self, rows: torch.Tensor, blocks: torch.Tensor, trained: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per row: loss (mean over its target tokens), "every target right", how many are right, and
        the margin gap (see :func:`_row_scores`)."""
        device = self.data.targets.device
        rows_on = rows.to(device)
        inputs = {name: value.index_select(0, rows_on) for name, value in self.data.batch.inputs.items()}
        targets = self.data.targets.index_select(0, rows_on)
        kwargs = {"use_cache": False}
        if self.keep:
            kwargs["logits_to_keep"] = self.keep
            targets = targets[:, -self.keep :]
        if targets.dim() == 1:  # classifier: one label per row
            row_of, picked, where = torch.arange(targets.shape[0], device=device), targets, None
        else:
            where = torch.nonzero(targets != IGNORE, as_tuple=True)  # (row, column) of every scored token
            row_of, picked = where[0], targets[where]
        if self.cache is not None:
            self.cache.rows = rows_on if self.cache.replaying else None
        state = CallState(key_module=self.key_module, training=trained, training_blocks=blocks.to(device), prefix=self.cache)
        gathered = []

        def gather(module: nn.Module, args: tuple) -> tuple | None:
            hidden = args[0]  # [rows, kept columns, hidden]
            if where is None or hidden.shape[:2] != targets.shape:
                return None
            gathered.append(True)
            return (hidden[where].unsqueeze(0), *args[1:])  # [1, scored tokens, hidden]

        handles = [self.head.register_forward_pre_hook(gather)] if self.head is not None else []
        if self.top_mlp is not None and where is not None:
            handles += self._narrow_top_mlp(state, where, targets.shape)
        try:
            with use_state(state):
                logits = self.model(**inputs, **kwargs).logits
        finally:
            for handle in handles:
                handle.remove()
        if self.cache is not None and not self.cache.replaying:
            self.cache.replaying = True  # the first pass saw every row and recorded the frozen prefix
        if gathered:
            logits = logits[0]  # [scored tokens, vocabulary]
        elif where is not None:
            logits = logits[where]
        return _row_scores(logits, picked, row_of, targets.shape[0])


    def _narrow_top_mlp(self, state: CallState, where: tuple[torch.Tensor, torch.Tensor], kept: torch.Size) -> list:
        """Hooks that run the top MLP on the scored tokens only, one token per row [tokens, 1, hidden]
        (each through its row's block), and put its output back at their positions (zero elsewhere:
        nothing reads it there). On the first call, a probe that checks the MLP's shapes instead."""
        mlp = self.top_mlp
        if self.top_mlp_plain is None:

            def probe(module: nn.Module, args: tuple, output: object) -> None:
                hidden = args[0] if args else None
                self.top_mlp_plain = (
                    isinstance(hidden, torch.Tensor)
                    and isinstance(output, torch.Tensor)
                    and hidden.dim() == 3
                    and output.shape == hidden.shape
                )

            return [mlp.register_forward_hook(probe)]
        if not self.top_mlp_plain:
            return []
        narrowed: list[tuple] = []

        def narrow(module: nn.Module, args: tuple) -> tuple:
            hidden = args[0]  # [rows, columns, hidden]; the kept columns are the last ones
            at = (where[0], where[1] + hidden.shape[1] - kept[1])
            narrowed.append((at, hidden.shape, state.training_blocks))
            state.training_blocks = state.training_blocks[where[0]]
            return (hidden[at].unsqueeze(1), *args[1:])

        def widen(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            at, shape, blocks = narrowed.pop()
            state.training_blocks = blocks
            return output.new_zeros(shape).index_put(at, output[:, 0])

        return [mlp.register_forward_pre_hook(narrow), mlp.register_forward_hook(widen)]


def _top_mlp(model: nn.Module, lora_modules: Sequence[str]) -> nn.Module | None:
    """The module holding a LoRA target when it is a direct child of the last layer of a layer stack
    (``model.layers.29.mlp`` for ``model.layers.29.mlp.down_proj``); None otherwise."""
    modules = dict(model.named_modules())
    for name in lora_modules:
        parts = name.split(".")
        if len(parts) < 4 or not parts[-3].isdigit():
            continue
        stack = modules.get(".".join(parts[:-3]))
        if isinstance(stack, nn.ModuleList) and int(parts[-3]) == len(stack) - 1:
            return modules[".".join(parts[:-1])]
    return None


def _logits_to_keep(model: nn.Module, data: TeacherForced) -> int:
    """How many last positions a causal LM must project to the vocabulary (0: all of them / not a causal LM).

    Causal batches are left padded, so every target sits in the last ``longest target + 1`` columns.
    """
    if data.targets.dim() != 2 or "decoder_input_ids" in data.batch.inputs:
        return 0
    if "logits_to_keep" not in inspect.signature(model.forward).parameters:
        return 0
    scored = (data.targets != IGNORE).any(0)
    first = int(torch.nonzero(scored).min()) if bool(scored.any()) else 0
    keep = data.targets.shape[1] - first
    return keep if keep < data.targets.shape[1] else 0


def _row_scores(
    logits: torch.Tensor, targets: torch.Tensor, row_of: torch.Tensor, rows: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """From the logits [tokens, classes] of the scored tokens, their targets [tokens] and rows
    [tokens], per row: mean cross-entropy, "every target right", the count right, and the margin gap
    (sum over its tokens of max(0, best other logit - target logit))."""
    logits = logits.float()
    token_loss = F.cross_entropy(logits, targets, reduction="none")
    with torch.no_grad():
        index = targets.unsqueeze(1)
        target_logit = logits.gather(1, index).squeeze(1)
        best_other = logits.scatter(1, index, -math.inf).amax(1)
        token_gap = (best_other - target_logit).clamp(min=0)
        token_right = logits.argmax(1) == targets
        count = torch.bincount(row_of, minlength=rows)
        right = torch.zeros(rows, dtype=torch.long, device=logits.device).index_add_(0, row_of, token_right.long())
        gap = torch.zeros(rows, device=logits.device).index_add_(0, row_of, token_gap)
    loss = torch.zeros(rows, device=logits.device).index_add(0, row_of, token_loss) / count.clamp(min=1)
    return loss, right == count, right, gap
