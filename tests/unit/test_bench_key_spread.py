"""Routing-level generality and locality computed from keys alone."""

import pytest
import torch

from bench.key_spread import routing_outcomes


def test_rephrase_counts_only_inside_radius_and_nearest_to_its_own_edit():
    edits = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    rephrases = torch.tensor([[0.5, 0.0], [6.0, 0.0], [9.0, 0.0]])  # near e0; near e1 but owned by e0; near e1
    owner = torch.tensor([0, 0, 1])
    far, near = torch.tensor([[0.0, 5.0]]), torch.tensor([[0.0, 1.0]])
    out = routing_outcomes(edits, rephrases, owner, torch.cat([far, near]), radius=2.0)
    assert out["route_gen"] == pytest.approx(2 / 3)
    assert out["route_loc"] == 0.5
