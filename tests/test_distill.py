"""Distillation on tiny random models: the losses, the frozen teacher, compute accounting and budgets, bad input."""

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, make_tokenizer, scalars
from test_training import FIX, TINY_DISTILL, args, run_cli
from torch import nn
from transformers import AutoConfig

from chop.training.cli import cli_main
from chop.models.loading import load_model
from chop.training import optim
from chop.training.distill import Distillation, DistillLoss, frozen_copy
from chop.training.losses import DIVERGENCES, LogitLoss, head_losses
from chop.training.pretrain import ContinuedPretraining

LLAMA = dict(TINY["llama"], vocab_size=1100)


def distill(**kw):
    """A configured Distillation module of the tiny Llama, outside a Trainer (teacher float32 on the CPU)."""
    module = Distillation(config=kw.pop("config", LLAMA), tokenizer=str(FIX / "tokenizer"), attn_implementation="eager", **kw)
    module.configure_model()
    return module


def batch(seed=0, shape=(2, 12)):
    x = torch.randint(2, 1100, shape, generator=torch.Generator().manual_seed(seed))
    return x[:, :-1], x[:, 1:]


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
    assert ckpt["chop"]["teacher"] == "random-init llama" and ckpt["chop"]["flops_seen"] == pytest.approx(4 * per_step)


def yaml_model(config):
    import yaml

    return yaml.safe_load(open(config))["model"]["init_args"]["config"]


def test_a_flop_budget_stops_training_and_ends_the_schedule(tmp_path):
    module = distill(chop={"strategy": "input", "n_remove": 2}, loss=DistillLoss(hidden=1.0))
    per_step = module.flops_per_token(16) * 4 * 16
    budget = 5.5 * per_step
    cli = cli_main(args(tmp_path, "--trainer.max_steps=100", "--trainer.val_check_interval=3", config=TINY_DISTILL,
                        callbacks=[("chop.training.callbacks.ComputeBudget", {"max_flops": budget})]))
    assert cli.trainer.global_step == 6  # ceil(5.5): the step that reaches the budget is the last
    lrs = scalars(tmp_path / "tiny_cpu_distill")["lr-AdamW/pg1"]
    assert len(lrs) == 6 and lrs[-1] < 0.35 * max(lrs)  # the cosine ran to its end over the 6 steps, not 100
    # The same budget buys continued pretraining of the same student more steps: it has no teacher to run.
    (tmp_path / "cp").mkdir()
    cp = cli_main(args(tmp_path / "cp", "--trainer.max_steps=100", "--trainer.val_check_interval=3",
                       callbacks=[("chop.training.callbacks.ComputeBudget", {"max_flops": budget})]))
    expected = math.ceil(budget / (ContinuedPretraining.flops_per_token(module, 16) * 4 * 16))
    assert cp.trainer.global_step == expected > 6


def test_a_token_budget_stops_training_after_a_whole_accumulated_step(tmp_path):
    # 7 micro-batches of 4 x 16 tokens reach the budget; with 2 per optimizer step, training ends after the 8th.
    cli = cli_main(args(tmp_path, "--trainer.max_steps=100", "--trainer.val_check_interval=8",
                        "--trainer.accumulate_grad_batches=2",
                        callbacks=[("chop.training.callbacks.ComputeBudget", {"max_tokens": 7 * 4 * 16})]))
    assert cli.trainer.global_step == 4 and cli.model.tokens_seen == 8 * 4 * 16


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
    from chop.cli import export
    from transformers import AutoModelForCausalLM

    cli_main(args(tmp_path, "--trainer.max_steps=4", "--model.export_on_end=false", config=TINY_DISTILL))
    out = export(str(tmp_path / "tiny_cpu_distill" / "checkpoints" / "last.ckpt"), str(tmp_path / "hf"))
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 4
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4


def test_resuming_with_another_teacher_or_none_is_refused(tmp_path):
    cli_main(args(tmp_path, "--trainer.max_steps=4", "--model.export_on_end=false", config=TINY_DISTILL))
    with pytest.raises(ValueError, match="was trained with teacher 'random-init llama', but this run's is None"):
        cli_main(args(tmp_path, "--trainer.max_steps=8", "--ckpt_path=last",  # continued pretraining, same student
                      "--trainer.logger.init_args.name=tiny_cpu_distill"))
