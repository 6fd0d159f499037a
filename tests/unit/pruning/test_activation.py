"""Activation-based width pruning as Minitron does it (chop/pruning/activation.py): every layer keeps the same widths,
the units of largest activation (mean over the sequence, L2 over the batch), and the result is a standard config that
plain ``from_pretrained`` loads with the same logits; hidden channels too."""

import pytest
import torch
from helpers import TINY
from transformers import AutoModelForCausalLM

from chop.models.loading import load_model
from chop.pruning import statistics
from chop.pruning.activation import Activation
from chop.pruning.structures import linears, prunable_params


def batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 128, (2, 17), generator=g) for _ in range(n)]


def model(layers=3):
    torch.manual_seed(0)
    return load_model(config=dict(TINY["llama"], num_hidden_layers=layers)).eval()


def test_each_layer_keeps_its_mlp_units_of_largest_activation_and_plain_transformers_loads_it(tmp_path):
    net, calib = model(), batches()
    downs = {n: l for n, l in linears(net).items() if n.endswith("down_proj")}
    stats = statistics.gather(net, downs, calib, statistics.mean_magnitude_squares)
    dense = {n: l.weight.detach().clone() for n, l in downs.items()}
    report = Activation(sparsity=0.3, align=4).prune(net, calib)
    widths = {w["intermediate_size"] for w in report.kept["widths"]}
    assert widths == {36}  # 64 units, 45% of the MLP's share of the parameters removed, rounded to 4
    assert not hasattr(net.config, "chop_widths") and net.config.intermediate_size == 36
    for name, layer in linears(net).items():
        if name.endswith("down_proj"):  # the kept columns are the 36 most active units, in order, unchanged
            keep = sorted(stats[name].topk(36).indices.tolist())
            assert torch.equal(layer.weight, dense[name][:, keep]), name
    assert report.params_after == prunable_params(linears(net))
    ids = torch.randint(2, 128, (2, 9))
    with torch.no_grad():
        want = net(input_ids=ids).logits
    net.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # a standard config: no chop, no remote code
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, want)


def test_hidden_channels_and_attention_groups_reach_the_target_and_reload(tmp_path):
    net = model()
    before = prunable_params(linears(net))
    report = Activation(sparsity=0.5, units=["mlp", "attention"], embedding=0.25, align=4).prune(net, batches())
    assert net.config.hidden_size == 24 and net.config.head_dim == 8  # 32 channels, a quarter removed
    assert net.get_input_embeddings().weight.shape == (128, 24)
    assert 1 - report.params_after / before == pytest.approx(0.5, abs=0.05)
    assert {(w["num_key_value_heads"], w["num_attention_heads"]) for w in report.kept["widths"]} == {(1, 2)}
    ids = torch.randint(2, 128, (2, 9))
    with torch.no_grad():
        want = net(input_ids=ids).logits
    net.save_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path).eval()(input_ids=ids).logits, want)


@pytest.mark.parametrize("spec, config, message", [
    (Activation(sparsity=0.3, embedding=0.3), "llama", "pruning.embedding"),
    (Activation(embedding=0.1), "gemma3_text", "pruning.embedding: chop slices the hidden channels of"),
    (Activation(units=["mlp", "ffn"]), "llama", "pruning.units"),
    (Activation(), "phi3", "structured pruning needs separate attention"),
])
def test_bad_settings_are_refused_before_any_forward(spec, config, message):
    net = load_model(config=dict(TINY[config], num_hidden_layers=2))
    with pytest.raises(ValueError, match=message):
        spec.prune(net, batches())
