"""`chop fit` end to end on the CPU: training, TensorBoard, checkpoints, exact resume, export, pruning before training,
and bad input."""

import json

import pytest
import torch
from helpers import (
    DROPOUT,
    TINY_CPU,
    TINY_DISTILL,
    args,
    run_cli,
    scalars,
    steps,
)
from transformers import AutoModelForCausalLM

from chop.cli import export
from chop.models.loading import load_model
from chop.pruning.structures import linears, prunable_params
from chop.training.callbacks import AtomicCheckpointIO
from chop.training.cli import cli_main
from chop.training.pretrain import ContinuedPretraining


def test_fit_with_surgeon_pruning_trains_the_smaller_model_exports_and_resumes(tmp_path):
    from helpers import args

    from chop.training.cli import cli_main

    pruning = '--model.pruning={"mode": "structured", "sparsity": 0.3, "shots": 2, "calibration_samples": 8}'
    first = cli_main(args(tmp_path, pruning, trainer={"max_steps": 4}))
    model = first.model.model
    report = first.model.pruning_report
    assert report.params_after == prunable_params(linears(model)) < report.params_before
    assert model.config.num_hidden_layers == 4  # chopped first (6 -> 4), then pruned
    hf = next(tmp_path.glob("**/checkpoints/hf"))
    ids = torch.randint(2, 1100, (2, 9))
    with torch.no_grad():
        assert torch.equal(load_model(str(hf)).eval()(input_ids=ids).logits, model.eval()(input_ids=ids).logits)
    resumed = cli_main(args(tmp_path, pruning, "--ckpt_path", "last", trainer={"max_steps": 8}))
    assert resumed.trainer.global_step == 8
    assert prunable_params(linears(resumed.model.model)) == report.params_after  # the checkpoint's shapes


class _Plants:
    """Unpickling it creates a file: a stand-in for a checkpoint that runs code when loaded."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_fit_logs_checkpoints_and_exports(tmp_path):
    cli_main(args(tmp_path, "--trainer.max_steps=8", "--trainer.num_sanity_val_steps=2"))
    run = tmp_path / "tiny_cpu" / "checkpoints"
    assert {"last.ckpt", "epoch=0-step=4.ckpt", "epoch=0-step=8.ckpt", "chop_plan.json", "hf"} <= {p.name for p in run.iterdir()}
    plan = json.loads((run / "chop_plan.json").read_text())
    assert plan["kept"] == [0, 3, 4, 5] and plan["params_after"] < plan["params_before"]
    tb = scalars(tmp_path / "tiny_cpu")
    for tag in ("train/loss", "val/loss", "val/ppl", "train/tokens_seen", "lr-AdamW/pg1", "train/device/items_per_sec",
                "train/device/mfu"):
        assert tag in tb, (tag, sorted(tb))
    assert all(v > 0 for v in tb["train/device/mfu"])
    assert tb["train/tokens_seen"][-1] == 8 * 4 * 16
    assert len(tb["val/loss"]) == 3  # the sanity pass is the step-0 baseline, then steps 4 and 8
    assert tb["val/loss"][-1] < tb["val/loss"][0]  # the random model learns the fixture's word order
    lrs = tb["lr-AdamW/pg1"]
    assert lrs[0] < lrs[1] == pytest.approx(3e-3) and lrs[-1] < lrs[2]  # warmup, then cosine decay
    hf = AutoModelForCausalLM.from_pretrained(run / "hf")
    assert hf.config.num_hidden_layers == 4
    # `chop export` from the checkpoint gives the same weights as the end-of-fit export.
    out = export(str(run / "last.ckpt"), str(tmp_path / "exported"))
    again = AutoModelForCausalLM.from_pretrained(out)
    x = torch.randint(2, 1100, (2, 10))
    torch.testing.assert_close(again(x).logits, hf(x).logits, rtol=0, atol=0)
    with pytest.raises(FileExistsError, match="--out: .* exists and is not empty"):
        export(str(run / "last.ckpt"), str(out))


@pytest.mark.parametrize("config,extra", [(TINY_CPU, [DROPOUT]), (TINY_DISTILL, [])], ids=["pretrain-dropout", "distill"])
def test_resume_after_kill_repeats_the_same_steps(tmp_path, config, extra):
    straight, broken = tmp_path / "a", tmp_path / "b"
    straight.mkdir(), broken.mkdir()
    record = lambda d: ("helpers.RecordSteps", {"path": str(d / "steps")})  # noqa: E731
    run_cli(*args(straight, "--trainer.max_steps=8", *extra, callbacks=[record(straight)], config=config))
    killed = run_cli(*args(broken, "--trainer.max_steps=8", *extra,
                           callbacks=[record(broken), ("helpers.KillAt", {"step": 4})], config=config), check=False)
    assert killed.returncode == 3
    assert len(steps(broken / "steps")) == 4
    run_cli(*args(broken, "--trainer.max_steps=8", "--ckpt_path=last", *extra, callbacks=[record(broken)], config=config))
    a, b = steps(straight / "steps"), steps(broken / "steps")
    assert [s["step"] for s in b] == list(range(1, 9))
    assert [s["batch"] for s in a] == [s["batch"] for s in b]
    terms = {"train/loss", "train/tokens_seen", "train/flops"} | ({"train/lm", "train/logits", "train/hidden"}
                                                                 if config == TINY_DISTILL else set())
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5, abs=1e-6)
        assert terms <= set(x["logged"]), sorted(x["logged"])
        for k in terms:
            assert x["logged"][k] == pytest.approx(y["logged"][k], rel=1e-5, abs=1e-6), (x["step"], k)
    assert b[-1]["logged"]["train/gpu_hours"] > b[3]["logged"]["train/gpu_hours"] > 0  # carried over the resume


def test_corrupt_checkpoint_is_refused_and_nothing_overwritten(tmp_path):
    cli_main(args(tmp_path, "--trainer.max_steps=4"))
    run = tmp_path / "tiny_cpu" / "checkpoints"
    last = run / "last.ckpt"
    last.write_bytes(last.read_bytes()[: 5000])
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    with pytest.raises(ValueError, match="--ckpt_path: .*last.ckpt' is not a readable checkpoint"):
        cli_main(args(tmp_path, "--trainer.max_steps=8", "--ckpt_path=last"))
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before


def test_checkpoint_of_another_model_is_refused(tmp_path):
    cli_main(args(tmp_path, "--trainer.max_steps=4"))
    with pytest.raises(ValueError, match="was trained from 'random-init llama', but model.name is 'random-init gpt2'"):
        cli_main(args(tmp_path, "--trainer.max_steps=8", "--ckpt_path=last",
                      '--model.config={"model_type": "gpt2", "vocab_size": 1100, "n_embd": 32, "n_layer": 6, "n_head": 4}'))


def test_checkpoint_chopped_otherwise_is_refused(tmp_path):
    cli_main(args(tmp_path, "--trainer.max_steps=4"))
    with pytest.raises(ValueError, match="model.chop: checkpoint .*'strategy': 'input'.*config .*'strategy': 'output'"):
        cli_main(args(tmp_path, "--trainer.max_steps=8", "--ckpt_path=last", "--model.chop.strategy=output"))


def test_unknown_config_key_is_named(tmp_path):
    proc = run_cli(*args(tmp_path, "--model.init_args.learning_rate=3"), check=False)
    assert proc.returncode != 0 and "learning_rate" in proc.stderr


def test_invalid_chop_target_fails_before_weights_load(tmp_path):
    from transformers import AutoConfig

    AutoConfig.for_model("llama", num_hidden_layers=6).save_pretrained(tmp_path / "no-weights")  # config only
    with pytest.raises((ValueError, SystemExit)) as err:
        cli_main(args(tmp_path, "--model.chop.n_remove=6", f"--model.name={tmp_path / 'no-weights'}", "--model.config=null"))
    assert "removing 6 of 6 layers is not allowed" in str(err.value.__context__ or err.value)


def test_atomic_checkpoint_survives_a_crash_while_saving(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def crash(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind
    (tmp_path / ".epoch=0-step=8.ckpt.x1y2.tmp").write_bytes(b"a save that was killed (SIGKILL: no cleanup)")
    io.save_checkpoint({"step": 3}, tmp_path / "epoch=0-step=12.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch=0-step=12.ckpt", "last.ckpt"]


def test_a_checkpoint_that_needs_code_is_refused_by_every_command(tmp_path):
    from chop.eval.eval_cli import run

    marker, evil = tmp_path / "code-ran", tmp_path / "evil.ckpt"
    torch.save({"chop": {"source": "random-init llama", "config": {}}, "state_dict": {}, "x": _Plants(marker)}, evil)
    need_code = "needs pickled Python objects to load, and loading them could run any code"
    with pytest.raises(ValueError, match=f"--model: .*evil.ckpt' {need_code}"):
        run(str(evil), tasks="arc_easy", device="cpu")
    with pytest.raises(ValueError, match=f"--ckpt: .*evil.ckpt' {need_code}"):
        export(str(evil), str(tmp_path / "out"))
    with pytest.raises(ValueError, match=f"--ckpt_path: .*evil.ckpt' {need_code}"):
        cli_main(args(tmp_path, f"--ckpt_path={evil}"))
    with pytest.raises(ValueError, match=need_code):
        AtomicCheckpointIO().load_checkpoint(evil)  # what Lightning itself calls to restore
    assert not marker.exists()


def test_a_diverging_run_stops_and_keeps_its_last_good_checkpoint(tmp_path):
    # Steps 6, 7 and 8 are not finite: their updates are skipped and the third stops the run.
    with pytest.raises(FloatingPointError, match=r"at step 8: .* not finite for 3 steps in a row "
                                                 r"\(model.max_nonfinite_steps\)"):
        cli_main(args(tmp_path, "--trainer.max_steps=40", callbacks=[("helpers.NanFrom", {"step": 6})]))
    run = tmp_path / "tiny_cpu" / "checkpoints"
    ckpt = torch.load(run / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] >= 4
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    assert not (run / "hf").exists()


def test_resume_builds_the_model_from_the_checkpoint_and_refuses_other_settings(tmp_path, monkeypatch):
    cli_main(args(tmp_path, "--trainer.max_steps=4"))
    run = tmp_path / "tiny_cpu" / "checkpoints"
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "tiny_cpu").rglob("*") if p.is_file()}
    for wrong, says in [("--model.chop.n_remove=3", r"model.chop: checkpoint .*'n_remove': 2.*config .*'n_remove': 3"),
                        ('--model.config={"model_type": "llama", "vocab_size": 1100, "hidden_size": 64, '
                         '"num_attention_heads": 4, "num_hidden_layers": 6}', "model.config: checkpoint .*'hidden_size': 32"),
                        ("--data.seq_len=4096", "data.seq_len: 4096 is longer than the model's max_position_embeddings")]:
        with pytest.raises(ValueError, match=says):
            cli_main(args(tmp_path, "--trainer.max_steps=8", "--ckpt_path=last", wrong))
    with pytest.raises(FileExistsError, match="run folder .* already holds checkpoints .*--ckpt_path last"):
        cli_main(args(tmp_path, "--trainer.max_steps=8"))
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "tiny_cpu").rglob("*") if p.is_file()} == before

    def no_source(self):
        raise AssertionError("a resumed run loaded and chopped its source model again")

    monkeypatch.setattr(ContinuedPretraining, "load_source", no_source)
    cli = cli_main(args(tmp_path, "--trainer.max_steps=8", "--ckpt_path=last"))
    assert cli.trainer.global_step == 8 and cli.model.plan.kept == [0, 3, 4, 5]
    assert not list(run.glob("last-v*.ckpt"))


def test_unstructured_pruning_before_training_keeps_its_zeros_through_training_and_resume(tmp_path):
    """Wanda 50% before training: the removed weights are still exactly zero after the updates (and in the export),
    also after a resume, and the rest have trained."""
    from chop.models.loading import load_model
    from chop.pruning.structures import linears

    pruning = '--model.pruning={"method": "wanda", "sparsity": 0.5, "calibration_samples": 8}'
    first = cli_main(args(tmp_path, pruning, trainer={"max_steps": 4}))
    start = {n: l.weight.detach().clone() for n, l in linears(first.model.model).items()}
    cli_main(args(tmp_path, pruning, "--ckpt_path", "last", trainer={"max_steps": 8}))
    hf = sorted(tmp_path.glob("**/checkpoints/hf*"))[-1]
    for name, layer in linears(load_model(str(hf))).items():
        w = layer.weight.detach()
        assert float((w == 0).float().mean()) == 0.5, name  # each row keeps half: no zero came back to life
        assert not torch.equal(w, start[name]), name  # and the kept half trained on
