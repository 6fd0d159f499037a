"""Optimizer groups, the learning-rate schedule, Lion, FLOPs per token, and the training switches."""

import math

import pytest
import torch

from chop.models.loading import load_model
from chop.training import optim
from chop.training.flops import ModelSize
from conftest import TINY


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


def test_flops_per_token_by_hand():
    model = load_model(config=TINY["llama"])  # 6 layers, hidden 32
    n = sum(p.numel() for p in model.parameters())
    assert ModelSize.of(model).train_flops(64) == 6 * n + 12 * 6 * 32 * 64
    assert ModelSize.of(model).forward_flops(64) == 2 * n + 4 * 6 * 32 * 64
    # The 1.1B student of the throughput benchmark: 6N + 12 L d s at s = 2048.
    with torch.device("meta"):
        big = load_model(config=dict(model_type="llama", hidden_size=2048, num_hidden_layers=22, num_attention_heads=32,
                                     num_key_value_heads=4, intermediate_size=5632, vocab_size=32000))
    n = sum(p.numel() for p in big.parameters())
    assert n == 1_100_048_384
    assert ModelSize.of(big).train_flops(2048) == pytest.approx(6 * n + 12 * 22 * 2048 * 2048)


def test_gradient_checkpointing_gives_the_same_gradients():
    from chop.training.pretrain import ContinuedPretraining

    grads = []
    x = torch.randint(2, 128, (2, 9))
    for ckpt in (False, True):
        module = ContinuedPretraining(config=TINY["llama"], gradient_checkpointing=ckpt, attn_implementation="eager")
        module.configure_model()
        module.training_loss(x[:, :-1], x[:, 1:])["loss"].backward()
        grads.append(torch.cat([p.grad.flatten() for p in module.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])
    assert math.isfinite(grads[0].sum().item())
