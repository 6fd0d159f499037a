"""Model loading (chop/models/loading.py): a model built under a GPU (Lightning's ``configure_model`` runs there) is
the model the CPU builds, to the bit, as chop eval, lm-eval and ``from_pretrained`` build its export."""

import pytest
import torch
from helpers import TINY

from chop.models.loading import load_model
from chop.training.pretrain import ContinuedPretraining

# SmolLM2's head_dim (64) and RoPE base (1e5): a GPU computes some of their inverse frequencies an ulp from the CPU's.
ROPE = dict(TINY["llama"], hidden_size=256, num_attention_heads=4, num_key_value_heads=4, rope_theta=100000.0)


@pytest.mark.gpu
def test_a_model_built_under_the_gpu_has_the_weights_and_buffers_the_cpu_builds():
    """RoPE's ``inv_freq`` is derived at build rather than loaded; built on the GPU, it moved a trained SmolLM2's bf16
    scores by a few documents from its export's (H200). chop builds on the CPU, then moves the model."""
    on_cpu = load_model(config=ROPE)
    derived = 1.0 / (1e5 ** (torch.arange(0, 64, 2, dtype=torch.float, device="cuda") / 64))
    assert torch.equal(on_cpu.model.rotary_emb.inv_freq, 1.0 / (1e5 ** (torch.arange(0, 64, 2).float() / 64)))
    assert not torch.equal(derived.cpu(), on_cpu.model.rotary_emb.inv_freq)  # so the comparisons below can fail
    with torch.device("cuda"):
        on_gpu = load_model(config=ROPE)
        module = ContinuedPretraining(config=ROPE)
        module.configure_model()
    want = {**dict(on_cpu.named_parameters()), **dict(on_cpu.named_buffers())}
    for model in (on_gpu, module.model):
        got = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        assert got.keys() == want.keys()
        assert all(t.device.type == "cuda" for t in got.values())
        assert [k for k in want if not torch.equal(got[k].cpu(), want[k])] == []


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_a_random_init_drawn_on_its_device_has_every_weight_drawn_and_the_cpu_buffers(arch):
    """``init_device`` builds on the meta device and lets transformers draw the weights where they live (benchmarks'
    7B models: seconds instead of minutes): nothing left as the uninitialised memory ``to_empty`` gives, and the
    derived buffers (RoPE's frequencies, Gemma's embedding scale) are the CPU build's."""
    config = TINY[arch]
    built = load_model(config=config, dtype="bfloat16")
    drawn = load_model(config=config, dtype="bfloat16", init_device="cpu")
    assert drawn.dtype == torch.bfloat16
    assert dict(drawn.named_buffers()).keys() == dict(built.named_buffers()).keys()
    assert all(torch.equal(b, dict(built.named_buffers())[n]) for n, b in drawn.named_buffers())
    std = built.config.initializer_range
    for name, p in drawn.named_parameters():
        want = dict(built.named_parameters())[name]
        if "norm" in name:  # ones (zeros for Gemma's 1 + w), as the CPU build
            assert torch.equal(p, want), name
        else:
            assert abs(p.float().std().item() - std) < 0.2 * std, name
    with pytest.raises(ValueError, match="init_device"):
        load_model("HuggingFaceTB/SmolLM2-135M-Instruct", init_device="cpu")


@pytest.mark.gpu
def test_a_random_init_drawn_on_the_gpu_keeps_the_cpu_rope_frequencies():
    """Drawn on the GPU (``init_device``), the weights live there and RoPE's ``inv_freq`` is still the CPU's (the
    GPU's own differs by an ulp for this shape, as the test above shows)."""
    model = load_model(config=ROPE, init_device="cuda")
    assert all(t.device.type == "cuda" for t in model.state_dict().values())
    assert torch.equal(model.model.rotary_emb.inv_freq.cpu(), load_model(config=ROPE).model.rotary_emb.inv_freq)
