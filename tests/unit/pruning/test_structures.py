"""Structures and their choice (chop/pruning/structures.py): one threshold over all layers, or the same widths in every
layer (``uniform``), each layer giving up its cheapest units first and never its last."""

import random

import pytest
from helpers import TINY

from chop.models.loading import load_model
from chop.pruning.structures import choose, structures


def groups_and_costs(seed=0):
    model = load_model(config=dict(TINY["llama"], num_hidden_layers=3, intermediate_size=96))
    groups = structures(model)
    rng = random.Random(seed)
    return groups, [rng.random() * (10 if s.kind == "attention" else 1) for s in groups]


@pytest.mark.parametrize("uniform", [False, True])
def test_the_budget_is_met_each_layer_keeps_a_unit_and_its_cheapest_go_first(uniform):
    groups, cost = groups_and_costs()
    total = sum(s.params for s in groups)
    choose(groups, cost, 0.3 * total, align=8, uniform=uniform)
    removed = sum(s.params for s in groups if s.removed)
    unit = max(s.params for s in groups if s.kind == "mlp")
    if uniform:  # slice by slice until the budget is met: at most one slice (8 units or a group per layer) over
        assert 0.3 * total <= removed <= 0.3 * total + 3 * max(8 * unit, max(s.params for s in groups))
    else:  # the cheapest until the budget is met, then each layer's MLP rounded to a multiple of 8 (either way)
        assert abs(removed - 0.3 * total) <= 3 * 4 * unit
    widths = {}
    for layer in range(3):
        for kind in ("mlp", "attention"):
            mine = [(c, s) for c, s in zip(cost, groups) if s.layer == layer and s.kind == kind]
            kept = [c for c, s in mine if not s.removed]
            gone = [c for c, s in mine if s.removed]
            assert kept and (not gone or max(gone) <= min(kept))  # within a layer: the cheapest go first
            widths.setdefault(kind, set()).add(len(kept))
    assert all(w % 8 == 0 for w in widths["mlp"])
    if uniform:
        assert all(len(w) == 1 for w in widths.values())  # the same widths in every layer
    else:
        assert len(widths["mlp"]) > 1  # random costs: the one threshold leaves layers different widths


def test_uniform_removal_continues_from_earlier_shots():
    groups, cost = groups_and_costs()
    total = sum(s.params for s in groups)
    first = choose(groups, cost, 0.1 * total, align=8, uniform=True)
    again = choose(groups, cost, 0.3 * total, align=8, uniform=True)
    assert first and again and not first & again
    assert 0.3 * total <= sum(s.params for s in groups if s.removed)
