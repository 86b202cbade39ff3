"""Routing-level ES / generality / locality computed from keys with the runtime's VectorDB."""

import pytest
import torch

from bench.key_spread import parse_args, results_table, routing_outcomes


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


def test_the_split_conflict_policy_keeps_the_edits_forget_drops_routable():
    # One cluster of "a" (centre (1,0), radius 1) that a "b" edit at d = 1.6 halves: (0,0) and
    # (2,0) fall outside 0.8. "forget" drops them; "split" keeps them as clusters of their own.
    edits = torch.tensor([[0.0, 0.0], [2.0, 0.0], [1.0, 0.0], [2.6, 0.0]])
    labels = ["a", "a", "a", "b"]
    far = torch.tensor([[50.0, 0.0]])
    out = {
        policy: routing_outcomes(edits, labels, edits, torch.arange(4), far, radius=1.0, batch_size=4,
                                 conflict_policy=policy)
        for policy in ("forget", "split")
    }
    assert out["forget"]["forgotten"] == 2 and out["forget"]["route_es"] == 0.5
    assert out["split"]["forgotten"] == 0 and out["split"]["route_es"] == 1.0
    assert out["forget"]["conflicts"] == out["split"]["conflicts"] == 1
    assert out["split"]["conflict_policy"] == "split" and out["split"]["route_loc"] == 1.0
    assert (out["forget"]["clusters"], out["split"]["clusters"]) == (2, 4)


def test_arguments_pick_the_dataset_and_policies_and_the_table_names_them():
    args = parse_args(["--dataset", "counterfact", "--conflict-policies", "forget,split"])
    assert args.dataset == "counterfact" and args.conflict_policies == ["forget", "split"]
    assert parse_args([]).conflict_policies == ["forget"] and parse_args([]).dataset == "zsre"
    with pytest.raises(SystemExit):
        parse_args(["--conflict-policies", "forget,keep"])
    row = {"dataset": "counterfact", "key_module": "model.layers.23.mlp.up_proj", "fraction": 0.45,
           "calibration_median": 22.46, "radius": 10.1, "conflict_policy": "split", "route_es": 0.985,
           "route_gen": 0.005, "route_loc": 0.975, "clusters": 197, "conflicts": 82, "forgotten": 3}
    table = results_table([row])
    assert table.splitlines()[-1] == (
        "| counterfact | model.layers.23.mlp.up_proj | 10.10 (0.45 x 22.5) | split "
        "| 0.985 | 0.005 | 0.975 | 197 | 82 | 3 |"
    )
