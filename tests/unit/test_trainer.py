"""Block training: prefix caching changes nothing but speed; early stop; only the new block learns."""

import dataclasses

import pytest
import torch

from melo_runtime import Edit
from melo_runtime.encoding import IGNORE
from melo_runtime.trainer import _hold_still, _Progress, _progressed, _row_scores, train_block, _Margin

PROMPTS = ["The capital of France is", "Who wrote Hamlet?"]
TARGETS = [" Lyon", " Marlowe"]


def _train(editor, *, cache_prefix: bool, iterations: int = 8, scored_only: bool = True):
    config = dataclasses.replace(editor.config, iterations=iterations, early_stop=False)
    if editor.config.task == "classify":
        data = editor.encoder.teacher_forced(PROMPTS, [1, 0])
    else:
        data = editor.encoder.teacher_forced(PROMPTS, TARGETS)
    return train_block(
        editor.model,
        data,
        editor.factors,
        editor.blocks,
        config,
        key_module=editor.attachment.key_module,
        prefix_layers=editor.attachment.prefix_layers,
        cache_prefix=cache_prefix,
        scored_only=scored_only,
    )


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "t5"])
def test_prefix_caching_gives_the_same_loss_curve_and_block_as_full_recomputation(make_editor, family):
    editor = make_editor(family, learnable=True)
    assert editor.attachment.prefix_layers  # the preset leaves frozen layers below the LoRA layers
    cached = _train(editor, cache_prefix=True)
    full = _train(editor, cache_prefix=False)
    assert len(cached.losses) == len(full.losses) == 9
    assert torch.allclose(torch.tensor(cached.losses), torch.tensor(full.losses), rtol=1e-5, atol=1e-6)
    assert cached.losses[-1] < cached.losses[0]
    # One block per edits_per_block rows (the scope preset gives a decoder one block per edit).
    assert len(cached.blocks) == len(full.blocks) == -(-len(PROMPTS) // editor.config.edits_per_block)
    for block, reference in zip(cached.blocks, full.blocks, strict=True):
        for name, (a, b) in block.items():
            assert torch.allclose(a, reference[name][0], atol=1e-5)
            assert torch.allclose(b, reference[name][1], atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_computing_only_the_scored_positions_on_top_gives_the_same_loss_curve_and_block(make_editor, family):
    editor = make_editor(family, learnable=True)
    head = editor.model.get_output_embeddings()
    top_mlp = editor.model.get_submodule(editor.config.target_modules[-1].rsplit(".", 1)[0])
    projected, mlp_positions = [], []
    handles = [
        head.register_forward_hook(lambda module, args, output: projected.append(output.shape[:-1].numel())),
        top_mlp.register_forward_hook(lambda module, args, output: mlp_positions.append(args[0].shape[:-1].numel())),
    ]
    try:
        scored = _train(editor, cache_prefix=True, scored_only=True)
        scored_positions, scored_mlp = projected[0], mlp_positions[1:]
        projected.clear()
        mlp_positions.clear()
        full = _train(editor, cache_prefix=True, scored_only=False)
    finally:
        for handle in handles:
            handle.remove()
    data = editor.encoder.teacher_forced(PROMPTS, TARGETS)
    tokens = int((data.targets != IGNORE).sum())
    assert scored_positions == tokens < projected[0]
    # The top layer's MLP, after the first pass that checks its shapes, runs on the scored tokens only.
    assert set(scored_mlp) == {tokens} and set(mlp_positions) == {data.targets.numel()}
    assert torch.allclose(torch.tensor(scored.losses), torch.tensor(full.losses), rtol=1e-5, atol=1e-6)
    for name, (a, b) in scored.blocks[0].items():
        assert torch.allclose(a, full.blocks[0][name][0], atol=1e-5)
        assert torch.allclose(b, full.blocks[0][name][1], atol=1e-5)


def test_replayed_layers_skip_their_computation(make_editor):
    editor = make_editor("llama")
    attention = editor.attachment.prefix_layers[0].self_attn
    runs = []
    handle = attention.register_forward_hook(lambda module, args, output: runs.append(1))
    try:
        _train(editor, cache_prefix=True, iterations=6)
        cached_runs = len(runs)
        runs.clear()
        _train(editor, cache_prefix=False, iterations=6)
    finally:
        handle.remove()
    assert cached_runs == 1 and len(runs) == 7


def test_training_stops_early_once_every_edit_is_learned(make_editor):
    editor = make_editor("gpt2", learnable=True)
    result = editor.apply_batch([Edit("a", PROMPTS[0], TARGETS[0])])
    assert result.learned == {"a": True}
    assert 0 < result.iterations_run < editor.config.iterations
    assert editor.score([PROMPTS[0]], [TARGETS[0]]) == [1.0]


def test_classifier_training_learns_the_label(make_editor):
    editor = make_editor("bert")
    before = editor.classify(PROMPTS)
    flipped = ["positive" if label == "negative" else "negative" for label in before]
    result = editor.apply_batch([Edit("a", PROMPTS[0], flipped[0]), Edit("b", PROMPTS[1], flipped[1])])
    assert result.learned == {"a": True, "b": True}
    assert editor.classify(PROMPTS) == flipped


def test_an_edit_not_learned_keeps_no_key_and_no_block(make_editor):
    editor = make_editor("gpt2", iterations=1, max_iterations=1, retry_rounds=0)
    result = editor.apply_batch([Edit("a", PROMPTS[0], TARGETS[0])])
    assert result.not_learned == ["a"] and result.learned == {"a": False}
    assert result.edit_losses["a"] > 0 and result.blocks_added == 0
    assert editor.blocks == 0 and editor.edit_ids() == set()
    assert editor.route([PROMPTS[0]]) == [None]  # the base model answers: no block without the edit


def _rows_per_forward(editor, edits):
    layer = next(iter(editor.attachment.layers.values()))
    rows_seen = []
    handle = layer.register_forward_pre_hook(lambda module, args: rows_seen.append(args[0].shape[0]))
    try:
        result = editor.apply_batch(edits)
    finally:
        handle.remove()
    return result, rows_seen


@pytest.mark.parametrize("per_block", [1, 2])
def test_a_finished_block_leaves_the_batch_and_every_row_is_learned_at_the_end(make_editor, per_block):
    editor = make_editor("llama", learnable=True, edits_per_block=per_block)
    edits = [Edit(str(i), p, t) for i, (p, t) in enumerate(zip(PROMPTS, TARGETS))]
    result, rows_seen = _rows_per_forward(editor, edits)
    assert all(result.learned.values())
    if per_block == 1:
        assert rows_seen[0] == 2 and 1 in rows_seen  # the first finished block stopped costing compute
    else:
        assert set(rows_seen) == {2}  # rows of one block train together until both are right
    assert editor.generate(PROMPTS, max_new_tokens=10) == TARGETS


def test_a_block_whose_rows_all_left_stops_moving_while_the_others_train():
    a = torch.zeros(2, 3, requires_grad=True)  # two blocks' factors, stacked as the trainer keeps them
    optimizer = torch.optim.Adam([a], lr=0.1)
    for _ in range(3):  # both blocks train and build up momentum
        optimizer.zero_grad()
        (a * torch.tensor([[1.0], [2.0]])).sum().backward()
        optimizer.step()
    before = a.detach().clone()
    optimizer.zero_grad()
    (a[1] * 2.0).sum().backward()  # block 0's rows were learned: it gets no gradient
    _hold_still(optimizer, torch.tensor([1]), count=2)
    optimizer.step()
    assert torch.equal(a[0].detach(), before[0])  # without the hold, momentum would move it on
    assert not torch.equal(a[1].detach(), before[1])


def test_a_shrinking_margin_gap_counts_as_progress_when_the_loss_is_flat():
    start = _Progress(loss=4.10, right=3, gap=2.0)
    assert _progressed(start, _Progress(loss=4.09, right=3, gap=1.5))  # capped logits: loss moves < 1%
    assert not _progressed(start, _Progress(loss=4.09, right=3, gap=1.99))
    assert _progressed(start, _Progress(loss=4.2, right=4, gap=2.5))


def test_the_margin_gap_sums_how_far_each_wrong_target_token_trails_the_best_other():
    logits = torch.tensor([[0.0, 1.0, 0.5], [2.0, 0.0, 0.0]])  # one row's two target tokens, vocabulary of 3
    targets = torch.tensor([2, 0])  # token 0 trails token 1 by 0.5; token 1 is right
    _, hits, right, gap = _row_scores(logits, targets, torch.tensor([0, 0]), rows=1)
    assert hits.tolist() == [False] and right.tolist() == [1]
    assert torch.allclose(gap, torch.tensor([0.5]))


def test_a_margin_trains_a_right_block_on_until_its_loss_is_low_and_never_past_its_patience():
    # Block 0 becomes all right at iteration 3 with a loss above the margin; block 1 is right and low.
    margin = _Margin(dataclasses.replace(_margin_config(), margin_loss=0.2, lr_step=5), count=2)
    blocks = torch.tensor([0, 0, 1])
    hits = torch.tensor([True, True, True])
    losses = torch.tensor([0.5, 0.1, 0.1])
    assert margin.done(hits, losses, blocks, iteration=3).tolist() == [False, True, True]
    assert margin.done(hits, losses, blocks, iteration=7).tolist() == [False, True, True]
    assert margin.done(hits, losses, blocks, iteration=8).tolist() == [True, True, True]  # patience spent
    # A wrong row is never done, whatever its loss; without a margin "right" is enough.
    assert margin.done(torch.tensor([False, True, True]), torch.zeros(3), blocks, 9).tolist() == [False, True, True]
    plain = _Margin(_margin_config(), count=2)
    assert plain.done(hits, losses, blocks, iteration=0).tolist() == [True, True, True]


def _margin_config():
    from melo_runtime.config import MeloConfig

    return MeloConfig(task="generate", key_module="k", target_modules=["t"], rank_per_block=2, r_init=1.0, edits_per_block=2)


def test_with_a_margin_a_real_block_ends_with_a_lower_loss_and_every_edit_learned(make_editor):
    edits = [Edit(str(i), p, t) for i, (p, t) in enumerate(zip(PROMPTS, TARGETS))]
    plain = make_editor("llama", learnable=True, margin_loss=0.0).apply_batch(edits)
    margin = make_editor("llama", learnable=True, margin_loss=0.05).apply_batch(edits)
    assert all(plain.learned.values()) and all(margin.learned.values())
    assert max(margin.edit_losses.values()) < max(plain.edit_losses.values())


def test_a_retry_keeps_an_edits_earlier_block_when_it_would_unlearn_a_required_row():
    from melo_runtime.trainer import _kept_groups

    rows, groups = [0, 1, 2, 3], [0, 0, 1, 1]
    required = [True, False, True, False]  # each edit: its prompt decides "learned", an extra row does not
    before = [True, False, True, False]  # round 1 learned both prompts, neither extra row
    # The retry learns edit 0's extra row but loses its prompt; edit 1 keeps its prompt.
    now = {0: False, 1: True, 2: True, 3: False}
    assert _kept_groups(rows, groups, required, before, now) == {0}
    # An edit not learned before always takes the retry's block.
    assert _kept_groups(rows, groups, required, [False] * 4, now) == set()
