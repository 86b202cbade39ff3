"""Routing-level ES / generality / locality computed from keys with the runtime's VectorDB."""

import pytest
import torch

from bench.key_spread import routing_outcomes


def test_routing_outcomes_follow_the_vectordb_rules():
    edits = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    rephrases = torch.tensor([[0.5, 0.0], [9.5, 0.0], [9.0, 0.0]])  # near e0; near e1 but owned by e0; near e1
    owner = torch.tensor([0, 0, 1])
    locality = torch.tensor([[0.0, 5.0], [0.0, 1.0]])  # far from both; inside e0's radius
    out = routing_outcomes(edits, ["a", "b"], rephrases, owner, locality, radius=2.0, batch_size=1)
    assert out["route_es"] == 1.0
    assert out["route_gen"] == pytest.approx(2 / 3)
    assert out["route_loc"] == 0.5
    assert out["conflicts"] == 0 and out["forgotten"] == 0


def test_a_close_edit_with_another_label_is_a_conflict():
    edits = torch.tensor([[0.0, 0.0], [3.0, 0.0]])  # within R_C + R_init = 4 of the first cluster
    out = routing_outcomes(edits, ["a", "b"], edits, torch.tensor([0, 1]), torch.tensor([[50.0, 0.0]]),
                           radius=2.0, batch_size=1)
    assert out["conflicts"] == 1
    assert out["route_es"] == 1.0  # both edits still reach their own block after the radii shrink
