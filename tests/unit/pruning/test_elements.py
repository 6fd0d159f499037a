"""Element selection (chop/pruning/elements.py): n:m masks, per-row masks, one global threshold."""

import torch

from chop.pruning.elements import nm_costs

D = torch.float64


def test_nm_masks_have_exactly_n_of_every_m_and_the_cheapest():
    costs = torch.rand(7, 16, dtype=D)
    for n, m in ((2, 4), (1, 4), (3, 8)):
        group, mask = nm_costs(costs, n, m)
        assert (mask.view(7, -1, m).sum(-1) == n).all()
        assert torch.allclose(group, costs.view(7, -1, m).sort(-1).values[..., :n].sum(-1))
