"""LLM Surgeon, K-OBD and magnitude (chop/pruning/surgeon.py, magnitude.py) on tiny Llama and OPT models: targets,
alignment, uniform widths, masks, block-by-block curvature, LoRA between shots, and bad settings."""

import json

import pytest
import torch
from helpers import TINY

from chop.models.loading import load_model
from chop.pruning import kfac
from chop.pruning.structures import linears, prunable_params, structures
from chop.pruning.surgeon import KOBD, LoRA, Surgeon

# -- end to end on tiny models ---------------------------------------------------------------------------------
def calibration(vocab=128, n=4, seq=17, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (2, seq), generator=g) for _ in range(n // 2)]


def calibration_loss(model, batches):
    with torch.no_grad():
        return sum(float(torch.nn.functional.cross_entropy(model(input_ids=b[:, :-1]).logits.flatten(0, 1),
                                                           b[:, 1:].flatten())) for b in batches) / len(batches)


# Gemma 3 (q/k norms, a head_dim of its own) is the study's second model
@pytest.mark.parametrize("arch", ["llama", "opt", "gemma3_text"])
def test_structured_pruning_hits_the_target_and_reloads_with_identical_logits(arch, tmp_path):
    torch.manual_seed(0)
    cfg = dict(TINY[arch], num_hidden_layers=3)
    model = load_model(config=cfg).eval()
    before = prunable_params(linears(model))
    largest = max(s.params for s in structures(model))
    report = Surgeon(mode="structured", sparsity=0.3, shots=3, align=1).prune(model, calibration())
    removed = before - report.params_after
    assert 0.3 * before <= removed <= 0.3 * before + largest * 3  # within one structure per layer
    assert [r["target"] for r in report.shots] == pytest.approx([0.1, 0.2, 0.3])
    assert report.params_after == prunable_params(linears(model))  # physically smaller, not zeros
    widths = model.config.get_text_config()
    ids = torch.randint(2, 128, (2, 11))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "pruned")
    (tmp_path / "pruned" / "pruning.json").write_text(json.dumps(report.to_dict()))
    again = load_model(str(tmp_path / "pruned")).eval()
    with torch.no_grad():
        got = again(input_ids=ids).logits
    assert torch.equal(got, want)
    assert widths.to_dict().get("chop_widths") == again.config.to_dict().get("chop_widths")


def test_kept_mlp_widths_are_rounded_to_the_alignment():
    torch.manual_seed(0)
    model = load_model(config=dict(TINY["llama"], num_hidden_layers=3, intermediate_size=96)).eval()
    before = prunable_params(linears(model))
    report = Surgeon(mode="structured", sparsity=0.3, shots=2, align=16).prune(model, calibration())
    widths = [w["intermediate_size"] for w in report.kept["widths"]]
    assert all(w % 16 == 0 for w in widths) and sum(widths) < 3 * 96
    assert 1 - report.params_after / before == pytest.approx(0.3, abs=0.1)


def test_unstructured_and_semistructured_masks():
    torch.manual_seed(0)
    model = load_model(config=dict(TINY["llama"], num_hidden_layers=2)).eval()
    report = Surgeon(mode="unstructured", sparsity=0.5, shots=2).prune(model, calibration())
    zeros = sum(int((l.weight == 0).sum()) for l in linears(model).values())
    total = sum(l.weight.numel() for l in linears(model).values())
    assert zeros / total == pytest.approx(0.5, abs=0.01) and report.params_after == total - zeros
    model = load_model(config=dict(TINY["llama"], num_hidden_layers=2)).eval()
    Surgeon(mode="semistructured", n=2, m=4, shots=2).prune(model, calibration())
    for layer in linears(model).values():
        assert ((layer.weight.view(layer.out_features, -1, 4) == 0).sum(-1) == 2).all()


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_curvature_block_by_block_prunes_exactly_as_all_at_once(arch, monkeypatch):
    """blocks_per_pass: each pass gathers the factors of at most that many blocks (so only theirs are resident), and
    the pruned model is the one that all factors at once give."""
    calls = []
    collect = kfac.collect
    monkeypatch.setattr(kfac, "collect", lambda model, layers, *a: calls.append(sorted(layers)) or collect(model, layers, *a))
    pruned = {}
    for per_pass in (0, 2):
        torch.manual_seed(0)
        model = load_model(config=dict(TINY[arch], num_hidden_layers=5)).eval()
        Surgeon(mode="structured", sparsity=0.3, shots=2, align=1, blocks_per_pass=per_pass).prune(model, calibration())
        pruned[per_pass] = model.state_dict()
    per_block = len(linears(model)) // 5
    assert [len(c) for c in calls] == [5 * per_block] * 2 + [2 * per_block, 2 * per_block, per_block] * 2
    assert pruned[0].keys() == pruned[2].keys()
    for name, w in pruned[0].items():
        assert torch.allclose(w, pruned[2][name], atol=1e-6), name


@pytest.mark.parametrize("mode", ["structured", "unstructured"])
def test_first_order_updates_between_shots_lower_the_loss_and_keep_pruned_weights_removed(mode):
    """LoRA between shots (and a final pass) trains on the calibration batches: their loss ends below that of the
    same pruning without it, while the removed structures (sliced away) or weights (zeros) stay removed."""
    batches = calibration(n=8)
    result = {}
    for rank in (0, 4):
        torch.manual_seed(0)
        model = load_model(config=dict(TINY["llama"], num_hidden_layers=2)).eval()
        spec = Surgeon(mode=mode, sparsity=0.4, shots=2, align=1,
                       lora=LoRA(rank=rank, lr=1e-2, fraction=0.5) if rank else None)
        report = spec.prune(model, batches)
        result[rank] = (calibration_loss(model, batches), report)
        if mode == "unstructured":
            zeros = sum(int((l.weight == 0).sum()) for l in linears(model).values())
            assert zeros == report.params_before - report.params_after
    (plain, plain_report), (tuned, tuned_report) = result[0], result[4]
    assert tuned < plain - 0.03
    assert tuned_report.params_after == plain_report.params_after  # the same amount removed
    assert [("lora_loss" in r) for r in tuned_report.shots] == [True, True]


@pytest.mark.parametrize("spec, message", [
    (Surgeon(sparsity=1.2), "pruning.sparsity"),
    (Surgeon(sparsity=0.0), "pruning.sparsity"),
    (Surgeon(mode="semistructured", n=4, m=4), "pruning.n/m"),
    (Surgeon(mode="pruney"), "pruning.mode: 'pruney' is not one of"),
    (Surgeon(shots=0), "pruning.shots"),
    (Surgeon(lora=LoRA(rank=0)), "pruning.lora.rank"),
    (Surgeon(lora=LoRA(fraction=0.0)), "pruning.lora.fraction"),
    (Surgeon(lora=LoRA(final=1.5)), "pruning.lora.final"),
    (Surgeon(blocks_per_pass=-1), "pruning.blocks_per_pass"),
    (Surgeon(mode="unstructured", blocks_per_pass=1), "pruning.blocks_per_pass"),
    (Surgeon(mode="unstructured", uniform=True), "pruning.uniform"),
    (KOBD(calibration_samples=0), "pruning.calibration_samples"),
])
def test_bad_settings_are_refused_before_curvature(spec, message, monkeypatch):
    monkeypatch.setattr(kfac, "collect", lambda *a, **k: pytest.fail("curvature computed"))
    model = load_model(config=dict(TINY["llama"], num_hidden_layers=2))
    with pytest.raises(ValueError, match=message):
        spec.prune(model, calibration())


def test_an_architecture_without_a_registry_entry_is_refused(monkeypatch):
    from chop.models import registry

    model = load_model(config=dict(TINY["llama"], num_hidden_layers=2))
    monkeypatch.delitem(registry.ARCHITECTURES, "llama")
    with pytest.raises(NotImplementedError, match="no registry entry for model_type 'llama'"):
        Surgeon().prune(model, calibration())
    with pytest.raises(ValueError, match="structured pruning needs separate attention"):
        Surgeon().check(load_model(config=dict(TINY["phi3"], num_hidden_layers=2)).config)


@pytest.mark.gpu
def test_semistructured_weights_run_on_pytorch_2_to_4_kernels():
    from chop.pruning.sparse import to_semi_structured

    torch.manual_seed(0)
    cfg = dict(TINY["llama"], hidden_size=256, intermediate_size=512, num_hidden_layers=2)
    with torch.device("cuda"):
        model = load_model(config=cfg).eval()
    Surgeon(mode="semistructured", shots=1).prune(model, [b.cuda() for b in calibration()])
    model = model.to(torch.bfloat16)
    ids = torch.randint(2, 128, (4, 64), device="cuda")
    with torch.no_grad():
        want = model(input_ids=ids).logits.float()
        assert to_semi_structured(model) == len(linears(model))
        got = model(input_ids=ids).logits.float()
    assert torch.allclose(got, want, atol=0.1, rtol=0.05)


@pytest.mark.gpu
def test_block_by_block_surgeon_keeps_its_inverses_off_the_gpu():
    """Block by block, each pass's factors leave the GPU with the pass: the GPU memory in use when a pass ends does
    not grow with the passes (at the Llama-2-7B shape the consumers' inverses grew it by 1 GiB a block)."""
    import logging

    torch.manual_seed(0)
    cfg = dict(TINY["llama"], hidden_size=512, intermediate_size=2048, num_hidden_layers=4)
    with torch.device("cuda"):
        model = load_model(config=cfg)
    in_use = []

    class AtPassEnd(logging.Handler):
        def emit(self, record):
            in_use.append(torch.cuda.memory_allocated())

    log = logging.getLogger("chop.pruning.surgeon")
    handler, level = AtPassEnd(), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        Surgeon(sparsity=0.2, shots=1, align=1, blocks_per_pass=1).prune(model, [b.cuda() for b in calibration()])
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    down = 8 * 2048**2  # one block's kept input inverse of down_proj alone: 32 MiB
    assert len(in_use) == 4 and in_use[3] - in_use[1] < down / 4, in_use


def test_curvature_that_cannot_fit_on_the_gpu_is_refused_before_the_first_pass(monkeypatch):
    """The Llama-2-7B shape (on the meta device: shapes, no memory): one block's float64 factors are 548,077,568
    entries (q/k/v/o 4096² in and out; gate/up 4096² in, 11008² out; down 11008² in, 4096² out), a pass holds them
    twice, and a structured Surgeon keeps o's and down's input inverses (4096² + 11008² a layer, 32 layers): on the
    GPU when all blocks are in one pass, in host memory block by block. 10 blocks a time cannot fit in 80 GiB; 9 can,
    before activations."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from chop.pruning.surgeon import check_curvature_fits, curvature_bytes

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    per_pass, kept = curvature_bytes(model, 8, keeps_inverses=True)
    assert per_pass == 8 * (2 * 8 * 548_077_568 + 2 * 11008**2) and kept == 0
    assert curvature_bytes(model, 0, keeps_inverses=True)[1] == 8 * 32 * (4096**2 + 11008**2)
    free = 80 * 2**30
    with pytest.raises(ValueError, match=r"pruning\.blocks_per_pass: the curvature of 10 decoder blocks at a time "
                                         r"needs about 83 GiB of float64 factors; 80 GiB .* free.*Set "
                                         r"pruning\.blocks_per_pass to 9 or fewer"):
        check_curvature_fits(model, Surgeon(blocks_per_pass=10), free)
    check_curvature_fits(model, Surgeon(blocks_per_pass=9), free)
    check_curvature_fits(model, KOBD(blocks_per_pass=8), free)  # no inverses kept: 67 GiB fit
    with pytest.raises(ValueError, match=r"all decoder blocks at once needs about 263 GiB of float64 factors, plus 33 "
                                         r"GiB of inverses kept for the updates.*blocks_per_pass to 9 or fewer"):
        check_curvature_fits(model, Surgeon(), free)
    with pytest.raises(ValueError, match=r"pruning\.factors_device: the curvature of all decoder blocks at once needs "
                                         r"about 263 GiB.*Prune on a GPU with more memory, or set "
                                         r"pruning\.factors_device: cpu"):
        check_curvature_fits(model, Surgeon(mode="unstructured"), free)
    # chop's own pruning asks before its first pass (here a tiny model on a GPU with 1 MiB free: never collects)
    collected = []
    monkeypatch.setattr("chop.pruning.surgeon.free_gpu_bytes", lambda m: 2**20)
    monkeypatch.setattr(kfac, "collect", lambda *a, **k: collected.append(1))
    with pytest.raises(ValueError, match=r"pruning\.blocks_per_pass: the curvature of all decoder blocks at once"):
        Surgeon(sparsity=0.2, shots=1).prune(load_model(config=dict(TINY["llama"], hidden_size=512)), calibration())
    assert not collected
