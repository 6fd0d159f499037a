"""What every training module shares (chop/training/module.py): gradient checkpointing gives the same gradients."""

import math

import torch
from helpers import TINY


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
