"""FLOPs per token (chop/training/flops.py and each module's flops_per_token) against hand computations."""

import math
import shutil

import pytest
import torch
from helpers import FIX, LLAMA, TINY, batch, distill

from chop.models.loading import load_model
from chop.training import optim
from chop.training.distill import DistillLoss
from chop.training.flops import ModelSize
from chop.training.pretrain import ContinuedPretraining


def _llama_params(vocab, d, inter, layers, heads, kv):
    head_dim = d // heads
    per_layer = 2 * d * d + 2 * d * kv * head_dim + 3 * d * inter + 2 * d  # q, o, k, v, MLP, two RMSNorms
    return 2 * vocab * d + layers * per_layer + d  # embeddings, untied LM head, final norm


def test_flops_per_token_match_a_hand_computation(tmp_path):
    module = distill(chop={"strategy": "input", "n_remove": 2}, loss=DistillLoss(hidden=1.0))
    n_student, n_teacher = _llama_params(1100, 32, 64, 4, 4, 2), _llama_params(1100, 32, 64, 6, 4, 2)
    assert module.model_size.params == n_student and module.teacher_size.params == n_teacher
    s = 16
    student = 6 * n_student + 12 * 4 * 32 * s
    teacher = 2 * n_teacher + 4 * 6 * 32 * s
    assert module.flops_per_token(s) == student + teacher
    assert ContinuedPretraining.flops_per_token(module, s) == student  # what continued pretraining counts
    # A teacher twice as wide gets a learned projection; its parameters count as the student's.
    wide = dict(LLAMA, hidden_size=64, num_attention_heads=8, num_key_value_heads=4)
    load_model(config=wide).save_pretrained(tmp_path / "wide")
    shutil.copytree(FIX / "tokenizer", tmp_path / "wide", dirs_exist_ok=True)
    module = distill(teacher=str(tmp_path / "wide"), loss=DistillLoss(hidden=1.0))
    assert module.hidden_proj.weight.shape == (64, 32)
    n_wide = _llama_params(1100, 64, 64, 6, 8, 4)
    assert module.flops_per_token(s) == 6 * _llama_params(1100, 32, 64, 6, 4, 2) + 12 * 6 * 32 * s \
        + 2 * n_wide + 4 * 6 * 64 * s + 6 * 64 * 32
    losses = module.training_loss(*batch())
    assert losses["hidden"].item() > 0 and math.isfinite(losses["loss"].item())
    assert module.hidden_proj.weight in {p for g in optim.build(module, module.optim_cfg, 10)["optimizer"].param_groups
                                         for p in g["params"]}


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
