"""Compute accounting and budgets (chop/training/callbacks.py): FLOP and token budgets end training and the schedule."""

import math

from helpers import TINY_DISTILL, args, distill, scalars

from chop.training.cli import cli_main
from chop.training.distill import DistillLoss
from chop.training.pretrain import ContinuedPretraining


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
    from chop.training.callbacks import accounting

    assert cli.trainer.global_step == 4 and accounting(cli.trainer).tokens == 8 * 4 * 16
