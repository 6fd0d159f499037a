"""Chunked logit losses (chop/training/losses.py): the model's own cross-entropy, KL/JSD against naive ones, gradcheck."""

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY, batch, distill
from torch import nn

from chop.training.distill import DistillLoss
from chop.training.losses import DIVERGENCES, LogitLoss, head_losses
from chop.training.pretrain import ContinuedPretraining


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_divergence_and_its_gradient_are_zero_when_the_student_is_the_teacher(kind):
    module = distill(loss=DistillLoss(lm=0.0, logits=1.0, divergence=kind, temperature=2.0, hidden=1.0, embedding=1.0))
    losses = module.training_loss(*batch())
    for k in ("logits", "hidden", "embedding"):
        assert abs(losses[k].item()) < 1e-6, (k, losses[k])
    assert losses["lm"].item() > 1  # a random model: the LM term is not zero, only the teacher-student terms are
    losses["loss"].backward()
    grads = [p.grad for p in module.model.parameters()]
    assert all(g is not None for g in grads)
    assert max(g.abs().max().item() for g in grads) < 1e-6


def test_kl_of_a_different_student_is_positive_and_matches_a_hand_computation():
    module = distill(chop={"strategy": "input", "n_remove": 2}, loss=DistillLoss(lm=0.5, logits=2.0, temperature=3.0))
    inputs, targets = batch()
    losses = module.training_loss(inputs, targets)
    with torch.no_grad():
        s, t = module.model(inputs).logits, module.teacher(inputs).logits
    p_t = F.softmax(t / 3, -1)
    kl = (p_t * (F.log_softmax(t / 3, -1) - F.log_softmax(s / 3, -1))).sum(-1).mean() * 9
    ce = F.cross_entropy(s.flatten(0, 1), targets.flatten())
    torch.testing.assert_close(losses["logits"], kl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["lm"], ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["loss"], 0.5 * ce + 2.0 * kl, rtol=1e-5, atol=1e-6)
    assert losses["logits"].item() > 1e-3


@pytest.mark.parametrize("arch", sorted(TINY))
def test_the_chunked_lm_loss_is_the_models_own_cross_entropy(arch):
    """Body + head, in chunks, equals the HF forward's logits for every registered architecture (Gemma: soft-capped)."""
    module = ContinuedPretraining(config=TINY[arch], attn_implementation="eager", logit_chunk=7)
    module.configure_model()
    module.eval()
    x = torch.randint(2, 128, (2, 10))
    with torch.no_grad():
        ref = F.cross_entropy(module.model(x[:, :-1]).logits.flatten(0, 1), x[:, 1:].flatten())
        ours = module.logit_losses(module.hidden_states(x[:, :-1]), x[:, 1:])["lm"]
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_chunked_losses_and_gradients_equal_the_naive_ones(kind, softcap):
    torch.manual_seed(0)
    head_s, head_t = nn.Linear(16, 50, bias=False), nn.Linear(16, 50, bias=False).to(torch.bfloat16)
    s_fn = (lambda h: torch.tanh(head_s(h) / softcap) * softcap) if softcap else head_s
    hidden = torch.randn(3, 13, 16, requires_grad=True)
    teacher = torch.randn(3, 13, 16, dtype=torch.bfloat16)
    targets = torch.randint(0, 50, (3, 13))
    targets[0, :4] = -100  # ignored positions
    loss = LogitLoss(lm=0.7, distill=1.3, divergence=kind, temperature=2.0)
    results = []
    for chunk in (0, 5, 64):
        hidden.grad, head_s.weight.grad = None, None
        out = head_losses(hidden, targets, s_fn, loss, teacher, head_t, params=(head_s.weight,), chunk=chunk)
        (3 * out["loss"]).backward()
        results.append((out, hidden.grad.clone(), head_s.weight.grad.clone()))
    (ref, ref_h, ref_w), *chunked = results
    for out, g_h, g_w in chunked:
        for k in ("loss", "lm", "distill"):
            torch.testing.assert_close(out[k], ref[k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g_h, ref_h, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(g_w, ref_w, rtol=1e-5, atol=1e-7)
    assert ref_h[0, :4].abs().sum() == 0  # no gradient from ignored positions


def test_chunked_gradients_pass_gradcheck_in_float64():
    torch.manual_seed(0)
    teacher = nn.Linear(6, 11, bias=False).double()
    t_hidden, targets = torch.randn(2, 5, 6, dtype=torch.double), torch.randint(0, 11, (2, 5))
    loss = LogitLoss(lm=0.3, distill=1.0, divergence="jsd", temperature=1.5)

    def f(hidden, weight):
        return head_losses(hidden, targets, lambda h: h @ weight.T, loss, t_hidden, teacher, params=(weight,), chunk=3)["loss"]

    assert torch.autograd.gradcheck(f, (torch.randn(2, 5, 6, dtype=torch.double, requires_grad=True),
                                        torch.randn(11, 6, dtype=torch.double, requires_grad=True)))
