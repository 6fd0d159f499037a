"""Distillation (chop/training/distill.py) on tiny random models: the frozen teacher, checkpoints, layer maps, bad input."""

import json

import pytest
import torch
from helpers import (
    FIX,
    LLAMA,
    TINY_DISTILL,
    args,
    batch,
    distill,
    make_tokenizer,
    run_cli,
    scalars,
)
from transformers import AutoConfig

from chop.models.loading import load_model
from chop.training import optim
from chop.training.cli import cli_main
from chop.training.distill import Distillation, DistillLoss, frozen_copy


def yaml_model(config):
    import yaml

    return yaml.safe_load(open(config))["model"]["init_args"]["config"]


def test_no_gradient_reaches_the_teacher_and_it_stays_frozen():
    module = distill(chop={"strategy": "input", "n_remove": 2}, loss=DistillLoss(hidden=1.0, embedding=1.0))
    before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    groups = optim.build(module, module.optim_cfg, 10)["optimizer"].param_groups  # what configure_optimizers builds
    in_opt = {id(p) for g in groups for p in g["params"]}
    assert in_opt == {id(p) for p in module.model.parameters()}
    assert not in_opt & {id(p) for p in module.teacher.parameters()}
    module.train()
    assert not module.teacher.training and module.model.training  # train() leaves the teacher in eval mode
    module.training_loss(*batch())["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in module.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.model.parameters())
    for k, v in module.teacher.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_teacher_is_left_out_of_checkpoints_and_not_expected_back():
    module = distill(chop={"strategy": "input", "n_remove": 2}, loss=DistillLoss(hidden=1.0))
    state = module.state_dict()
    assert state and not any(k.startswith("teacher.") for k in state)
    assert {k for k in state if k.startswith("model.")} == {f"model.{k}" for k in module.model.state_dict()}
    fresh = distill(chop={"strategy": "input", "n_remove": 2}, loss=DistillLoss(hidden=1.0))
    fresh.load_state_dict(state, strict=True)  # the teacher's keys are not missing
    del state[next(k for k in state if k.startswith("model."))]
    with pytest.raises(RuntimeError, match="Missing key"):
        fresh.load_state_dict(state, strict=True)  # a student key still is


def test_frozen_copy_is_half_precision_keeps_ties_and_matches():
    model = load_model(config=dict(LLAMA, tie_word_embeddings=True))
    copy = frozen_copy(model, torch.bfloat16)
    assert copy.lm_head.weight is copy.model.embed_tokens.weight
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in copy.parameters())
    assert all(p.dtype == torch.float32 and p.requires_grad for p in model.parameters())
    torch.testing.assert_close(copy.model.embed_tokens.weight.float(), model.model.embed_tokens.weight, rtol=1e-2, atol=1e-2)


def test_fit_logs_every_loss_flops_and_hours_and_keeps_the_teacher_fixed(tmp_path):
    cli = cli_main(args(tmp_path, "--trainer.max_steps=6", config=TINY_DISTILL))
    module = cli.model
    tb = scalars(tmp_path / "tiny_cpu_distill")
    for tag in ("train/loss", "train/lm", "train/logits", "train/hidden", "train/flops", "train/gpu_hours", "val/loss"):
        assert tag in tb, (tag, sorted(tb))
    per_step = module.flops_per_token(16) * 4 * 16
    assert tb["train/flops"] == pytest.approx([per_step * i for i in range(1, 7)])
    assert tb["train/gpu_hours"][-1] > 0
    # The teacher is still the unchopped source, bit for bit.
    source = load_model(config=dict(yaml_model(TINY_DISTILL)))
    for k, v in source.state_dict().items():
        assert torch.equal(module.teacher.state_dict()[k], v), k
    ckpt = torch.load(tmp_path / "tiny_cpu_distill" / "checkpoints" / "last.ckpt", weights_only=False)
    assert not any(k.startswith("teacher.") for k in ckpt["state_dict"])
    assert ckpt["global_step"] == 4  # checkpoints every 4 steps
    assert ckpt["chop"]["teacher"] == "random-init llama" and ckpt["callbacks"]["ComputeAccounting"]["flops"] == pytest.approx(4 * per_step)


def test_a_teacher_with_another_tokenizer_is_refused_before_training(tmp_path):
    teacher = tmp_path / "teacher"
    make_tokenizer(teacher, n_doc_ids=500)
    AutoConfig.for_model(**LLAMA).save_pretrained(teacher)  # a config, no weights: nothing may try to load them
    with pytest.raises(ValueError, match="model.teacher: .*teacher' has another tokenizer than the student"):
        Distillation(config=LLAMA, tokenizer=str(FIX / "tokenizer"), teacher=str(teacher))
    proc = run_cli(*args(tmp_path, f"--model.teacher={teacher}", config=TINY_DISTILL), check=False)
    assert proc.returncode != 0 and "has another tokenizer than the student" in proc.stderr
    assert not (tmp_path / "tiny_cpu_distill" / "checkpoints").exists()


@pytest.mark.parametrize("loss, message", [
    (dict(logits=0.0, hidden=0.0, embedding=0.0), "the teacher would teach nothing"),
    (dict(divergence="kl"), "model.loss.divergence: 'kl' is not one of"),
    (dict(temperature=0.0), "model.loss.temperature"),
    (dict(lm=-1.0), "weights must be >= 0"),
])
def test_bad_loss_settings_are_named(loss, message):
    with pytest.raises(ValueError, match=message):
        DistillLoss(**loss)


def test_a_layer_map_that_does_not_fit_is_refused():
    with pytest.raises(ValueError, match=r"model.loss.layer_map: give one teacher layer in \[0, 6\) for each of the "
                                         r"student's 4 layers"):
        Distillation(config=LLAMA, chop={"strategy": "input", "n_remove": 2},
                     loss=DistillLoss(hidden=1.0, layer_map=[0, 1, 2, 9]))


def test_an_explicit_layer_map_is_used():
    module = distill(chop={"strategy": "input", "n_remove": 2}, loss=DistillLoss(hidden=1.0, layer_map=[0, 1, 2, 5]))
    assert module.layer_map == [0, 1, 2, 5]
    default = distill(chop={"strategy": "input", "n_remove": 2}, loss=DistillLoss(hidden=1.0))
    assert default.layer_map == default.plan.kept == [0, 3, 4, 5]
    # Student layer 0 is teacher layer 0 with the same weights and inputs: that pair contributes no loss.
    default.training_loss(*batch())
    inputs = batch()[0]
    with torch.no_grad():
        s = default.model(inputs, output_hidden_states=True).hidden_states[1]
        t = default.teacher(inputs, output_hidden_states=True).hidden_states[1]
    torch.testing.assert_close(s, t)


def test_distillation_checkpoint_exports_the_student_only(tmp_path):
    from transformers import AutoModelForCausalLM

    from chop.cli import export

    cli_main(args(tmp_path, "--trainer.max_steps=4", "--model.export_on_end=false", config=TINY_DISTILL))
    out = export(str(tmp_path / "tiny_cpu_distill" / "checkpoints" / "last.ckpt"), str(tmp_path / "hf"))
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 4
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4


def test_resuming_with_another_teacher_or_none_is_refused(tmp_path):
    cli_main(args(tmp_path, "--trainer.max_steps=4", "--model.export_on_end=false", config=TINY_DISTILL))
    with pytest.raises(ValueError, match="was trained with teacher 'random-init llama', but this run's is None"):
        cli_main(args(tmp_path, "--trainer.max_steps=8", "--ckpt_path=last",  # continued pretraining, same student
                      "--trainer.logger.init_args.name=tiny_cpu_distill"))
