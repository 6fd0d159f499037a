"""Fused kernels (chop/models/kernels.py): the switch refuses what cannot run before any weights load (CPU), and on
a GPU liger's kernels give the torch path's loss and gradients to bf16 rounding."""

import importlib.machinery
import sys
import types

import lightning as L
import pytest
import torch
from helpers import TINY

from chop.models import kernels
from chop.training.pretrain import ContinuedPretraining


def fake_liger(monkeypatch, model_types):
    """A stand-in for an installed liger-kernel that has kernels for ``model_types`` (none of them callable)."""
    for name in ("liger_kernel", "liger_kernel.transformers", "liger_kernel.transformers.monkey_patch"):
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        monkeypatch.setitem(sys.modules, name, module)
    sys.modules["liger_kernel.transformers.monkey_patch"].MODEL_TYPE_TO_APPLY_LIGER_FN = dict.fromkeys(model_types)


def test_liger_not_installed_is_refused_with_the_fix(monkeypatch):
    monkeypatch.setattr(kernels.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"model\.kernels: 'liger' needs the liger-kernel package.*pip install liger-kernel"):
        ContinuedPretraining(config=TINY["llama"], kernels="liger")
    ContinuedPretraining(config=TINY["llama"], kernels="torch")  # the default needs nothing


def test_a_model_liger_has_no_kernels_for_is_refused(monkeypatch):
    fake_liger(monkeypatch, ["llama"])
    with pytest.raises(ValueError, match=r"model\.kernels: liger-kernel has no kernels for model_type 'gpt2'.*kernels: torch"):
        ContinuedPretraining(config=TINY["gpt2"], kernels="liger")
    with pytest.raises(ValueError, match=r"model\.kernels: 'fused' is not one of \['torch', 'liger'\]"):
        ContinuedPretraining(config=TINY["llama"], kernels="fused")


def test_liger_on_the_cpu_is_refused_before_the_model_loads(monkeypatch, tmp_path):
    fake_liger(monkeypatch, ["llama"])
    module = ContinuedPretraining(config=TINY["llama"], kernels="liger")  # installed, and written for llama
    loads = []
    monkeypatch.setattr(module, "load_source", lambda: loads.append(1))
    data = L.LightningDataModule.from_datasets(train_dataset=[{"input_ids": torch.zeros(9, dtype=torch.long)}])
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        default_root_dir=tmp_path)
    with pytest.raises(ValueError, match=r"model\.kernels: liger-kernel's Triton kernels run on CUDA GPUs only.*'cpu'"):
        trainer.fit(module, data)
    assert not loads and module.model is None


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["pretraining", "distillation"])
def test_liger_gives_the_torch_loss_and_gradients_on_a_gpu(kind):
    """Both paths from the same weights, under bf16 autocast with float32 weights as `chop fit` trains: the same loss
    and the same gradient of every parameter, to bf16 rounding. (torch first: liger patches Llama's rotary function
    for the whole process.)"""
    from chop.training.distill import Distillation

    cfg = dict(TINY["llama"], hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
               vocab_size=32000, max_position_embeddings=512)
    ids = torch.randint(0, 32000, (4, 257), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    results = {}
    for k in ("torch", "liger"):
        make = ContinuedPretraining if kind == "pretraining" else Distillation
        extra = {} if kind == "pretraining" else {"loss": {"lm": 0.5, "logits": 1.0, "hidden": 1.0}}
        module = make(config=cfg, tokenizer=None, kernels=k, **extra)
        with torch.device("cuda"):
            module.configure_model()
        module.cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = module.training_loss(ids[:, :-1], ids[:, 1:])["loss"]
        loss.backward()
        results[k] = (loss.detach().float(), {n: p.grad.float() for n, p in module.named_parameters() if p.grad is not None})
    (loss_t, grads_t), (loss_l, grads_l) = results["torch"], results["liger"]
    torch.testing.assert_close(loss_l, loss_t, rtol=1e-2, atol=0)
    assert grads_t.keys() == grads_l.keys() and len(grads_t) > 10
    for name, g in grads_t.items():
        rel = ((grads_l[name] - g).norm() / g.norm()).item()
        assert rel < 3e-2, f"{name}: relative gradient difference {rel:.3g}"


@pytest.mark.parametrize("compile_", [False, True])
def test_under_compile_liger_keeps_only_its_cross_entropy(monkeypatch, compile_):
    """liger's module kernels break torch.compile's graphs (measured slower than either alone): with `compile` the
    model's own modules stay, for Inductor to fuse, and the loss still takes liger's fused cross-entropy."""
    fake_liger(monkeypatch, ["llama"])
    patched = []
    sys.modules["liger_kernel.transformers.monkey_patch"]._apply_liger_kernel_to_instance = \
        lambda model, **kw: patched.append(kw)
    module = ContinuedPretraining(config=TINY["llama"], kernels="liger", compile=compile_)
    module.configure_model()
    assert bool(patched) != compile_
    if patched:
        assert patched[0]["rms_norm"] and patched[0]["rope"] and patched[0]["swiglu"]
    fused = []
    monkeypatch.setattr("chop.training.pretrain.fused_cross_entropy", lambda h, t, head, cap: fused.append(1) or
                        torch.zeros((), requires_grad=True))
    x = torch.randint(2, 128, (2, 9))
    module.logit_losses(torch.randn(2, 8, 32, requires_grad=True), x[:, 1:])
    assert fused == [1]
