"""Wanda (chop/pruning/wanda.py): each row keeps its weights of largest |W|·‖x‖, with ‖x‖ measured on the model whose
earlier blocks are already pruned; n:m keeps the largest n of every m; nothing else changes."""

import pytest
import torch
from helpers import TINY

from chop.models.loading import load_model
from chop.models.registry import decoder_layers
from chop.pruning import statistics
from chop.pruning.structures import linears
from chop.pruning.wanda import Wanda


def batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 128, (2, 17), generator=g) for _ in range(n)]


def test_each_row_drops_its_lowest_weight_times_input_norm_measured_after_earlier_blocks_were_pruned():
    torch.manual_seed(0)
    model = load_model(config=dict(TINY["llama"], num_hidden_layers=3)).eval()
    dense = {name: l.weight.detach().clone() for name, l in linears(model).items()}
    calib = batches()
    report = Wanda(sparsity=0.5).prune(model, calib)
    layers = linears(model)
    assert report.params_after == report.params_before // 2
    # The inputs of q, k and v (the block's input, normed) do not depend on that block's own pruning: measured on the
    # final (pruned) model they are what Wanda saw, so its choice must be exactly the top half of each row.
    reading = {n: l for n, l in layers.items() if n.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj")}
    norms = statistics.gather(model, reading, calib, statistics.squares)
    for name, layer in reading.items():
        w = dense[name]
        score = w.abs().double() * norms[name].sqrt()
        keep = score.topk(w.shape[1] // 2, dim=1).indices
        want = torch.zeros_like(w).scatter(1, keep, w.gather(1, keep))
        assert torch.equal(layer.weight, want), name  # kept weights unchanged, the rest zero
    # ...and measured on the dense model, the later blocks' choices differ: the blocks were pruned in order.
    dense_model = load_model(config=dict(TINY["llama"], num_hidden_layers=3)).eval()
    last = {n: l for n, l in linears(dense_model).items() if n.startswith("model.layers.2.") and n in reading}
    unpruned = statistics.gather(dense_model, last, calib, statistics.squares)
    assert any(not torch.allclose(unpruned[n], norms[n]) for n in last)


def test_semistructured_keeps_the_largest_n_of_every_m():
    torch.manual_seed(0)
    model = load_model(config=dict(TINY["llama"], num_hidden_layers=2)).eval()
    Wanda(mode="semistructured", n=2, m=4).prune(model, batches())
    for layer in linears(model).values():
        assert ((layer.weight.view(layer.out_features, -1, 4) == 0).sum(-1) == 2).all()


def test_the_forward_stops_after_the_block_being_measured(monkeypatch):
    """Block i's statistics need blocks 0..i only: later blocks never run while it is measured."""
    model = load_model(config=dict(TINY["llama"], num_hidden_layers=3)).eval()
    ran = []
    for i, block in enumerate(decoder_layers(model)):
        block.register_forward_pre_hook(lambda m, a, i=i: ran.append(i))
    Wanda(sparsity=0.3).prune(model, batches(n=1))
    assert ran == [0, 0, 1, 0, 1, 2]


@pytest.mark.parametrize("spec, message", [
    (Wanda(sparsity=1.0), "pruning.sparsity"),
    (Wanda(mode="structured"), "pruning.mode: 'structured' is not one of"),
    (Wanda(mode="semistructured", n=3, m=2), "pruning.n/m"),
    (Wanda(calibration_samples=0), "pruning.calibration_samples"),
])
def test_bad_settings_are_refused_before_any_forward(spec, message):
    model = load_model(config=dict(TINY["llama"], num_hidden_layers=2))
    with pytest.raises(ValueError, match=message):
        spec.prune(model, batches())
