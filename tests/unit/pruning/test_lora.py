"""First-order updates between shots (chop/pruning/lora.py): adapter deltas stay zero where weights were removed."""

import torch


def test_an_adapter_delta_is_zero_where_weights_were_removed():
    from chop.pruning import lora

    layer = torch.nn.Linear(6, 5)
    rows, cols = torch.tensor([1.0, 0, 1, 1, 0]), torch.tensor([1.0, 1, 0, 1, 1, 1])
    for keep in ((rows, cols), torch.rand(5, 6) > 0.5):
        adapter = lora.Adapter(layer, 3, keep if isinstance(keep, tuple) else keep.float())
        torch.nn.init.normal_(adapter.B)
        delta = adapter.delta()
        removed = (rows[:, None] * cols[None, :] == 0) if isinstance(keep, tuple) else ~keep
        assert (delta[removed] == 0).all() and (delta[~removed] != 0).all()
        x = torch.randn(4, 6)
        assert torch.allclose(adapter(x), x @ delta.T, atol=1e-6)  # the low-rank path equals the masked delta
