"""The zero-shot callback (chop/training/zero_shot.py): evaluation during training, refusal of unknown tasks."""

import json

import pytest
from helpers import EVAL_FIX

from chop.cli import main


def test_callback_evaluates_during_training_logs_and_writes_json(tmp_path, caplog):
    from helpers import args, scalars

    from chop.training.cli import cli_main

    cb = ("chop.ZeroShotEvalCallback", {"tasks": "piqa,copa,lambada_openai", "every_n_steps": 2,
                                             "data_dir": str(EVAL_FIX), "batch_size": 8, "at_start": True})
    cli_main(args(tmp_path, "--trainer.max_steps=4", "--trainer.precision=bf16-mixed", callbacks=[cb]))
    tb = scalars(tmp_path / "tiny_cpu")
    assert len(tb["eval/piqa/acc"]) == 3 and len(tb["eval/lambada_openai/perplexity"]) == 3  # steps 0 (at_start), 2, 4
    assert all(0 <= a <= 1 for a in tb["eval/average"])
    run = tmp_path / "tiny_cpu" / "checkpoints"
    saved = json.loads((run / "eval-step=4.json").read_text())
    assert saved["step"] == 4 and saved["results"]["copa"]["n"] == 6
    assert json.loads((run / "eval-step=0.json").read_text())["step"] == 0  # the chopped model before training
    assert (run / "eval-step=2.json").exists() and not (run / "eval-step=4-v1.json").exists()  # once per step
    printed = caplog.text  # each evaluation says in the log when it starts and ends
    assert all(f"zero-shot evaluation at step {n}: done in" in printed for n in (0, 2, 4)), printed[-2000:]
    # `chop eval` of the step-4 checkpoint (its weights and the tokenizer it records), float32 weights under bf16
    # autocast as the run scored itself, gives the callback's numbers
    out = tmp_path / "ckpt.json"
    main(["eval", "--model", str(run / "last.ckpt"), "--tasks", "piqa,copa,lambada_openai", "--data_dir", str(EVAL_FIX),
          "--batch_size", "8", "--dtype", "bf16-mixed", "--output", str(out)])
    assert json.loads(out.read_text())["results"] == saved["results"]


def test_callback_refuses_an_unknown_task_when_the_config_is_read():
    from chop import ZeroShotEvalCallback

    with pytest.raises(ValueError, match="unknown task 'pika'"):
        ZeroShotEvalCallback(tasks="pika")
