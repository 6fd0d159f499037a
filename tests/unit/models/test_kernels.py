"""Fused kernels and the SDPA backend (chop/models/kernels.py): the switches refuse what cannot run before any weights
load (CPU); on a GPU liger's kernels give the torch path's loss and gradients, and cuDNN's attention flash attention's,
to bf16 rounding."""

import sys

import lightning as L
import pytest
import torch
from helpers import TINY, fake_liger
from transformers.models.llama import modeling_llama

from chop.models import kernels
from chop.training.pretrain import ContinuedPretraining

# Llama's own rotary function, taken before any test applies liger's kernels (which replace it for the process).
HF_ROPE = modeling_llama.apply_rotary_pos_emb


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
@pytest.mark.parametrize("kind,residual", [("pretraining", "float32"), ("distillation", "float32"),
                                           ("pretraining", "bfloat16")])
def test_liger_gives_the_torch_loss_and_gradients_on_a_gpu(kind, residual, monkeypatch):
    """Both paths from the same weights, under bf16 autocast with float32 weights as `chop fit` trains: the same loss
    and the same gradient of every parameter, to bf16 rounding; also with liger's path on a bf16 residual stream
    (``model.residual_dtype``: its RMSNorm then reads bf16 with float32 weights). (torch first, with Llama's own rotary
    function: liger's replaces it for the whole process.)"""
    from chop.training.distill import Distillation

    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", HF_ROPE)

    cfg = dict(TINY["llama"], hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
               vocab_size=32000, max_position_embeddings=512)
    ids = torch.randint(0, 32000, (4, 257), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    results = {}
    for k in ("torch", "liger"):
        make = ContinuedPretraining if kind == "pretraining" else Distillation
        extra = {} if kind == "pretraining" else {"loss": {"lm": 0.5, "logits": 1.0, "hidden": 1.0}}
        module = make(config=cfg, tokenizer=None, kernels=k, residual_dtype=residual if k == "liger" else "float32",
                      **extra)
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


def _hf_layout(batch: int, tokens: int, heads: int, dim: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Queries or keys as a Hugging Face attention hands them to the rotary function: the projection's (batch, tokens,
    heads, dim), transposed to (batch, heads, tokens, dim)."""
    return torch.randn(batch, tokens, heads, dim, dtype=dtype, device=device).transpose(1, 2)


@pytest.mark.parametrize("cos_rows", [1, 3])
def test_rope_given_the_batch_as_one_row_rotates_every_token_as_the_batch(cos_rows):
    """liger's rotary kernel is compiled anew for each batch size, so chop hands it every batch as one row, the rows
    end to end (``rope_as_one_row``); each token must come out as the batch's own call rotates it, whether the cos and
    sin are per row (packed positions) or one for all rows."""
    torch.manual_seed(0)
    q, k = _hf_layout(3, 7, 4, 8), _hf_layout(3, 7, 2, 8)
    cos, sin = torch.randn(cos_rows, 7, 8), torch.randn(cos_rows, 7, 8)
    batches = []

    def rope(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
        batches.append((q.shape[0], k.shape[0], cos.shape[0]))
        return HF_ROPE(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)

    want = HF_ROPE(q, k, cos, sin)
    got = kernels.rope_as_one_row(rope, q, k, cos, sin)
    assert batches == [(1, 1, 1)]
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.gpu
def test_liger_rope_compiles_once_for_batches_of_any_size(monkeypatch):
    """Evaluation's batches come in dozens of sizes (38 on the suite): after ``apply_kernels`` liger's rotary kernel
    is compiled for the first and serves the rest (Triton specialises the row count on divisibility by 16: at most
    two compilations), and rotates as torch's function does to bf16 rounding."""
    from liger_kernel.ops.rope import _triton_rope
    from transformers import LlamaConfig, LlamaForCausalLM

    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", HF_ROPE)  # restored after: liger patches the module
    config = LlamaConfig(**dict(TINY["llama"], num_attention_heads=8, num_key_value_heads=2, hidden_size=256))
    model = LlamaForCausalLM(config).cuda().to(torch.bfloat16)
    kernels.apply_kernels(model, "liger")

    def compiled() -> int:
        return sum(len(cache[0]) for cache in _triton_rope.device_caches.values())

    before = compiled()
    for rows, tokens in ((1, 16), (2, 33), (3, 40), (5, 17), (7, 64), (12, 23)):
        q, k = (_hf_layout(rows, tokens, h, 32, torch.bfloat16, "cuda") for h in (8, 2))
        positions = torch.randint(0, 500, (rows if rows % 2 else 1, tokens), device="cuda")
        cos, sin = model.model.rotary_emb(q, positions)
        want = HF_ROPE(q, k, cos, sin)
        got = modeling_llama.apply_rotary_pos_emb(q.clone(), k.clone(), cos, sin)  # liger's rotates in place
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1.6e-2, atol=1e-2)
    assert compiled() - before <= 2, f"{compiled() - before} compilations for 6 batch sizes"


@pytest.mark.gpu
def test_after_compile_ahead_a_forward_compiles_nothing_more(monkeypatch):
    """On a GPU, `compile_ahead` compiles (or finds in Triton's cache) every kernel a forward of liger's Llama runs,
    at token counts divisible by 16 and not: the forwards after it add no compilation (a shape no earlier test used,
    so that each kernel's count grows in compile_ahead itself)."""
    from liger_kernel.ops.rms_norm import _rms_norm_forward_kernel
    from liger_kernel.ops.rope import _triton_rope
    from liger_kernel.ops.swiglu import _swiglu_forward_kernel
    from transformers import LlamaConfig, LlamaForCausalLM

    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", HF_ROPE)  # restored after: liger patches the module
    config = LlamaConfig(**dict(TINY["llama"], hidden_size=320, intermediate_size=704, num_attention_heads=10,
                                num_key_value_heads=2))
    model = LlamaForCausalLM(config).cuda().to(torch.bfloat16).eval()
    kernels.apply_kernels(model, "liger")

    def compiled() -> list[int]:
        return [sum(len(cache[0]) for cache in jit.device_caches.values())
                for jit in (_rms_norm_forward_kernel, _swiglu_forward_kernel, _triton_rope)]

    before = compiled()
    kernels.compile_ahead(model)
    ahead = compiled()
    with torch.inference_mode():
        for rows, tokens in ((1, 256), (3, 85), (5, 51), (4, 64)):
            model(input_ids=torch.randint(0, config.vocab_size, (rows, tokens), device="cuda"), use_cache=False)
    assert all(a > b for a, b in zip(ahead, before)), (before, ahead)
    assert compiled() == ahead, f"compiled in the forwards: {compiled()} against {ahead} after compile_ahead"


def test_compile_ahead_calls_each_distinct_patched_module_once_and_the_rotary_at_two_counts(monkeypatch):
    """What `chop eval` compiles in threads before its first forward: one call of each distinct module liger patched
    (found by its bound forward: the class stays transformers'), and the rotary function at a token count divisible
    by 16 and one not; modules liger left alone are not called, and one patched with another signature is left to
    the forward."""
    import functools
    from transformers import LlamaConfig, LlamaForCausalLM

    calls = []

    def forward(self, x):
        calls.append((type(self).__name__, tuple(x.shape), torch.is_inference_mode_enabled()))
        return x

    def rope(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
        calls.append(("rope", tuple(q.shape), tuple(k.shape), tuple(cos.shape)))
        return q, k

    def attention(self, hidden, position_embeddings, attention_mask):
        calls.append("attention")

    forward.__module__ = rope.__module__ = attention.__module__ = "liger_kernel.ops.fake"  # as liger's own are
    model = LlamaForCausalLM(LlamaConfig(**dict(TINY["llama"], num_attention_heads=4, num_key_value_heads=2)))
    for layer in model.model.layers:
        for module in (layer.input_layernorm, layer.post_attention_layernorm, layer.mlp):
            module.forward = forward.__get__(module)  # how liger patches an instance
    model.model.layers[0].self_attn.forward = attention.__get__(model.model.layers[0].self_attn)
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", functools.partial(kernels.rope_as_one_row, rope))
    kernels.compile_ahead(model)
    width, dim = model.config.hidden_size, model.config.hidden_size // 4
    assert sorted(calls) == sorted([("LlamaRMSNorm", (256, width), True), ("LlamaMLP", (256, width), True),
                                    ("rope", (1, 4, 256, dim), (1, 2, 256, dim), (1, 256, dim)),
                                    ("rope", (1, 4, 255, dim), (1, 2, 255, dim), (1, 255, dim))])


def test_liger_is_imported_without_peft_and_leaves_peft_importable(monkeypatch, tmp_path):
    """liger-kernel imports peft where installed (a second of `chop eval`'s loading) only to recognise PEFT-wrapped
    modules: ``kernels.liger`` imports a module whose `import peft` then fails, and peft imports as before after."""
    (tmp_path / "peft.py").write_text("LOADED = True\n")
    (tmp_path / "liger_probe.py").write_text("try:\n    import peft\n    PEFT_AVAILABLE = True\n"
                                             "except ImportError:\n    PEFT_AVAILABLE = False\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("peft", "liger_probe", "liger_kernel.utils"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    assert kernels.liger("liger_probe").PEFT_AVAILABLE is False
    assert "peft" not in sys.modules
    import peft

    assert peft.LOADED
    monkeypatch.delitem(sys.modules, "liger_probe")
    assert kernels.liger("liger_probe").PEFT_AVAILABLE is True  # imported by then: nothing hidden
    monkeypatch.delitem(sys.modules, "peft")


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


def test_an_sdpa_backend_is_refused_where_it_cannot_choose_or_run(tmp_path):
    with pytest.raises(ValueError, match=r"model\.sdpa_backend: 'cudnn' chooses among PyTorch's SDPA backends, and "
                                         r"model\.attn_implementation is 'eager'.*attn_implementation: sdpa"):
        ContinuedPretraining(config=TINY["llama"], attn_implementation="eager", sdpa_backend="cudnn")
    with pytest.raises(ValueError, match=r"model\.sdpa_backend: 'fast' is not one of \['flash', 'cudnn'"):
        ContinuedPretraining(config=TINY["llama"], sdpa_backend="fast")
    module = ContinuedPretraining(config=TINY["llama"], sdpa_backend="cudnn")
    data = L.LightningDataModule.from_datasets(train_dataset=[{"input_ids": torch.zeros(9, dtype=torch.long)}])
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        default_root_dir=tmp_path)
    with pytest.raises(ValueError, match=r"model\.sdpa_backend: 'cudnn' runs on CUDA GPUs only.*'cpu'"):
        trainer.fit(module, data)
    assert module.model is None


def test_the_forward_tries_the_chosen_sdpa_backend_first(monkeypatch):
    """What PyTorch's SDPA sees as its backend order while chop's forward runs: the chosen one first, PyTorch's own
    order outside it."""
    from torch.nn.attention import SDPBackend

    seen = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **kw: seen.append(torch._C._get_sdp_priority_order()[0]) or real(*a, **kw))
    outside = torch._C._get_sdp_priority_order()
    for first, expected in ((None, outside[0]), ("math", int(SDPBackend.MATH)),
                            ("cudnn", int(SDPBackend.CUDNN_ATTENTION))):
        module = ContinuedPretraining(config=TINY["llama"], sdpa_backend=first)
        module.configure_model()
        seen.clear()
        module.training_loss(torch.randint(2, 100, (2, 8)), torch.randint(2, 100, (2, 8)))
        assert seen and set(seen) == {expected}, (first, seen)
    assert torch._C._get_sdp_priority_order() == outside


@pytest.mark.gpu
def test_cudnn_attention_gives_flash_attention_loss_and_gradients_on_a_gpu():
    """`sdpa_backend: cudnn` runs cuDNN's attention kernels (not a silent fallback) and trains the same model as
    flash attention to bf16 rounding."""
    cfg = dict(TINY["llama"], hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
               num_key_value_heads=2, vocab_size=1000, max_position_embeddings=512)
    ids = torch.randint(0, 1000, (4, 257), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    results, kernels_run = {}, {}
    for first in ("flash", "cudnn"):
        module = ContinuedPretraining(config=cfg, tokenizer=None, sdpa_backend=first)
        with torch.device("cuda"):
            module.configure_model()
        module.cuda()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = module.training_loss(ids[:, :-1], ids[:, 1:])["loss"]
            loss.backward()
            torch.cuda.synchronize()
        kernels_run[first] = " ".join(e.name.lower() for e in prof.events())
        results[first] = (loss.detach().float(), {n: p.grad.float() for n, p in module.named_parameters()})
    assert "cudnn" in kernels_run["cudnn"] and "flash" in kernels_run["flash"], kernels_run
    (loss_f, grads_f), (loss_c, grads_c) = results["flash"], results["cudnn"]
    torch.testing.assert_close(loss_c, loss_f, rtol=1e-2, atol=0)
    for name, g in grads_f.items():
        rel = ((grads_c[name] - g).norm() / g.norm()).item()
        assert rel < 3e-2, f"{name}: relative gradient difference {rel:.3g}"
