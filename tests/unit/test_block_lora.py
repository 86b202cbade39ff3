"""Block LoRA layer and factor storage: per-row blocks, exact base output elsewhere, no block cap."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from melo_runtime.block_lora import BlockFactors, BlockLoRALayer, linear_dims
from melo_runtime.routing import CallState, use_state


def _random_factors(n_blocks: int, d_in: int = 6, d_out: int = 5, rank: int = 2) -> BlockFactors:
    factors = BlockFactors(d_in, d_out, rank, torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    for _ in range(n_blocks):
        factors.append(torch.randn(rank, d_in, generator=generator), torch.randn(d_out, rank, generator=generator))
    return factors


def _call(layer: BlockLoRALayer, x: torch.Tensor, blocks: list[int], factors: BlockFactors) -> torch.Tensor:
    state = CallState(key_module="unused", factors={layer.name: factors}, blocks=torch.tensor(blocks))
    with use_state(state):
        return layer(x)


def test_blocks_grow_past_any_initial_capacity_and_keep_earlier_blocks():
    factors = _random_factors(3)
    first_a, first_b = factors.a[0].clone(), factors.b[0].clone()
    grown = _random_factors(37)
    assert grown.count == 37 and grown.a.shape == (37, 2, 6) and grown.b.shape == (37, 5, 2)
    for _ in range(40):
        factors.append(torch.zeros(2, 6), torch.zeros(5, 2))
    assert factors.count == 43
    assert torch.equal(factors.a[0], first_a) and torch.equal(factors.b[0], first_b)


def test_truncate_forgets_blocks_from_the_given_id():
    factors = _random_factors(5)
    factors.truncate(3)
    assert factors.count == 3 and factors.a.shape[0] == 3


def test_append_rejects_factors_of_the_wrong_shape():
    with pytest.raises(ValueError, match="rank 2"):
        _random_factors(1).append(torch.zeros(3, 6), torch.zeros(5, 3))


def test_conv1d_and_linear_report_input_and_output_widths():
    assert linear_dims(nn.Linear(6, 5)) == (6, 5)
    assert linear_dims(Conv1D(5, 6)) == (6, 5)  # Conv1D(nf=out, nx=in), weight (in, out)
    with pytest.raises(TypeError, match="Embedding"):
        linear_dims(nn.Embedding(3, 4))


@pytest.mark.parametrize("base", [nn.Linear(6, 5), Conv1D(5, 6)], ids=["linear", "conv1d"])
def test_rows_without_a_block_are_bit_identical_and_routed_rows_add_their_own_block(base):
    torch.manual_seed(0)
    layer = BlockLoRALayer("layer", base)
    factors = _random_factors(4)
    x = torch.randn(4, 3, 6)
    out = _call(layer, x, [-1, 2, -1, 0], factors)
    expected = base(x)
    assert torch.equal(out[0], expected[0]) and torch.equal(out[2], expected[2])
    for row, block in ((1, 2), (3, 0)):
        delta = x[row] @ factors.a[block].T @ factors.b[block].T
        assert torch.allclose(out[row], expected[row] + delta, atol=1e-6)


def test_mixed_block_batch_equals_each_row_alone():
    torch.manual_seed(1)
    layer = BlockLoRALayer("layer", nn.Linear(6, 5))
    factors = _random_factors(3)
    x = torch.randn(3, 4, 6)
    blocks = [1, -1, 2]
    together = _call(layer, x, blocks, factors)
    for row, block in enumerate(blocks):
        alone = _call(layer, x[row : row + 1], [block], factors)
        assert torch.allclose(together[row], alone[0], rtol=0, atol=1e-6)


def test_outside_an_editor_call_the_layer_is_the_base_layer():
    base = nn.Linear(6, 5)
    layer = BlockLoRALayer("layer", base)
    x = torch.randn(2, 3, 6)
    assert torch.equal(layer(x), base(x))


def test_batch_size_mismatch_with_routing_is_an_error_naming_the_layer():
    layer = BlockLoRALayer("h.4.mlp.c_fc", nn.Linear(6, 5))
    with pytest.raises(RuntimeError, match="h.4.mlp.c_fc"):
        _call(layer, torch.randn(2, 3, 6), [0, 0, 0], _random_factors(1))
