"""LayerChop: placements, targets and their errors, and chopped models that stay normal HF models."""

import pytest
import torch
from helpers import TINY
from transformers import AutoConfig, AutoModelForCausalLM

from chop.models.loading import load_model
from chop.models.registry import ARCHITECTURES
from chop.pruning.layerchop import LayerChop, angular_block_distances, apply_chop, block_influence, chop


def _identity_layer(layer):
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()


@pytest.mark.parametrize("strategy,expected", [
    ("input", [1, 2, 3]), ("output", [8, 9, 10]), ("middle", [4, 5, 6]), ("both", [1, 2, 10]),
    ("max_gap", [2, 6, 9]), ("top", [9, 10, 11]), ("bottom", [0, 1, 2]),
])
def test_placements(strategy, expected):
    assert LayerChop(strategy, n_remove=3).removed(12) == expected


def test_targets_agree():
    assert LayerChop("input", n_keep=9).removed(12) == LayerChop("input", fraction=0.25).removed(12) == [1, 2, 3]
    assert LayerChop("indices", indices=[7, 3]).removed(12) == [3, 7]


@pytest.mark.parametrize("spec,msg", [
    (LayerChop("input", n_remove=12), "at least 1 removed and 1 kept"),
    (LayerChop("input", n_remove=11), "at most 10"),
    (LayerChop("top", n_keep=0), "at least 1 removed and 1 kept"),
    (LayerChop("input"), "exactly one of n_remove, n_keep, fraction"),
    (LayerChop("input", n_remove=2, n_keep=3), "exactly one of"),
    (LayerChop("input", fraction=1.5), r"chop.fraction: 1.5 must be in \(0, 1\)"),
    (LayerChop("indices", indices=[3, 12]), r"chop.indices: \[12\] out of range"),
    (LayerChop("indices", indices=[3, 3]), "duplicates"),
    (LayerChop("indices", indices=[]), "list the layers to remove"),
    (LayerChop("nope", n_remove=1), "unknown 'nope'"),
])
def test_bad_targets(spec, msg):
    with pytest.raises(ValueError, match=msg):
        spec.n_to_remove(12)


@pytest.mark.parametrize("arch", sorted(TINY))
def test_chopped_model_reloads_and_generates(arch, tmp_path):
    model = load_model(config=TINY[arch]).eval()
    plan = chop(model, LayerChop("max_gap", n_remove=2))
    assert plan.kept == [0, 1, 3, 5] and plan.removed == [2, 4]
    assert model.config.num_hidden_layers == 4
    for v in vars(model.config).values():
        if isinstance(v, list) and v and isinstance(v[0], str):
            assert len(v) == 4  # per-layer lists such as layer_types follow the chop
    assert plan.params_after < plan.params_before
    x = torch.randint(2, 128, (2, 12))
    model.save_pretrained(tmp_path)
    reloaded, report = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(report.values()), report  # no weight missing, unexpected or mismatched: nothing random-init
    reloaded.eval()
    torch.testing.assert_close(reloaded(x).logits, model(x).logits, rtol=0, atol=0)
    with_cache = model.generate(x, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    without = model.generate(x, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(with_cache, without)


def test_a_layer_kind_given_by_index_that_chop_does_not_know_is_refused():
    model = load_model(config=TINY["qwen2_moe"]).eval()
    model.config.decoder_sparse_step, model.config.mlp_only_layers = 2, [0]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("chop.pruning.layerchop._keep_layer_kinds", lambda config, kept: None)
        with pytest.raises(NotImplementedError, match="qwen2_moe's config no longer describes the model"):
            chop(model, LayerChop("max_gap", n_remove=2))


def test_layer_idx_renumbered():
    model = load_model(config=TINY["llama"])
    apply_chop(model, [0, 4, 5])
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2]


def test_every_tiny_arch_is_registered():
    assert set(TINY) == set(ARCHITECTURES)


def test_unsupported_architecture_names_the_registry():
    model = load_model(config=dict(model_type="codegen", vocab_size=64, n_embd=16, n_layer=4, n_head=2, rotary_dim=4))
    with pytest.raises(NotImplementedError, match="no registry entry for model_type 'codegen'.*ARCHITECTURES"):
        chop(model, LayerChop("input", n_remove=1))


def test_block_influence_matches_hand_computation_and_removes_identity_layers():
    model = load_model(config=TINY["llama"]).eval()
    for i in (2, 4):
        _identity_layer(model.model.layers[i])
    x = torch.randint(2, 128, (3, 10))
    scores = block_influence(model, [x])
    hs = model(x, output_hidden_states=True).hidden_states  # hs[i] = input of layer i (the last one is normed)
    for i in range(len(scores) - 1):
        cos = torch.nn.functional.cosine_similarity(hs[i].double(), hs[i + 1].double(), dim=-1)
        assert scores[i] == pytest.approx((1 - cos).mean().item(), abs=1e-6)
    assert scores[2] == pytest.approx(0, abs=1e-6) and scores[4] == pytest.approx(0, abs=1e-6)
    plan = chop(model, LayerChop("block_influence", n_remove=2), calibration=[x])
    assert plan.removed == [2, 4]
    angular = block_influence(load_model(config=TINY["llama"]).eval(), [x], angular=True)
    assert all(0 <= a <= 1 for a in angular)


def test_angular_block_matches_hand_computation_and_removes_the_consecutive_layers_that_change_least():
    """Gromov et al.'s block distance: two adjacent identity layers make a block of distance 0, removed whole (a lone
    identity layer, 5, does not make a block of two)."""
    model = load_model(config=TINY["llama"]).eval()
    for i in (1, 2, 5):
        _identity_layer(model.model.layers[i])
    x = torch.randint(2, 128, (3, 10))
    dist = angular_block_distances(model, [x], n=2)
    assert len(dist) == model.config.num_hidden_layers - 1 and dist[1] == pytest.approx(0, abs=1e-6)
    hs = model(x, output_hidden_states=True).hidden_states  # hs[i] = input of layer i (the last one is normed)
    cos = torch.nn.functional.cosine_similarity(hs[3].double(), hs[5].double(), dim=-1).clamp(-1, 1)
    assert dist[3] == pytest.approx((torch.arccos(cos) / torch.pi).mean().item(), abs=1e-6)
    assert chop(model, LayerChop("angular_block", n_remove=2), calibration=[x]).removed == [1, 2]
    with pytest.raises(ValueError, match="angular_block needs calibration"):
        chop(load_model(config=TINY["llama"]), LayerChop("angular_block", n_remove=2))


def test_plan_is_recorded_in_config(tmp_path):
    model = load_model(config=TINY["gpt2"])
    chop(model, LayerChop("top", n_keep=2))
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).chop_plan["kept"] == [0, 1]
