"""Optimizer groups, the learning-rate schedule, Lion, FLOPs per token, and the training switches."""

import pytest
import torch
from helpers import TINY

from chop.models.loading import load_model
from chop.training import optim


def test_no_weight_decay_on_norms_and_biases():
    model = load_model(config=TINY["opt"])  # OPT has biases and LayerNorm weights and biases
    decay, no_decay = optim.param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert no_decay["weight_decay"] == 0 and decay["weight_decay"] == 0.1
    assert all(p.ndim == 1 for p in no_decay["params"]) and all(p.ndim == 2 for p in decay["params"])
    assert any("layer_norm" in names[id(p)] for p in no_decay["params"])
    assert any(names[id(p)].endswith("bias") for p in no_decay["params"])


def test_warmup_then_cosine_to_the_floor():
    f = [optim.warmup_cosine(s, warmup=10, total=110, min_ratio=0.1) for s in range(120)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[60] == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    assert f[110] == pytest.approx(0.1) and f[119] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[9:], f[10:]))


def test_lion_steps_by_the_sign():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    opt = optim.Lion([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.0)
    p.grad = torch.tensor([0.5, -0.1, 0.0])
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([0.9, -1.9, 3.0]))


def test_bad_optimizer_settings_are_named():
    with pytest.raises(ValueError, match="model.optim.name: 'sgd'"):
        optim.Optim(name="sgd")
