"""SmolLM2-135M-Instruct, the real model from chop's offline copy: chop 30 -> 15, reload, generate, train."""

import pytest
import torch
import yaml
from helpers import ROOT
from transformers import AutoModelForCausalLM, AutoTokenizer

from chop.models.loading import load_model, resolve
from chop.pruning.layerchop import LayerChop, chop
from chop.training.cli import cli_main

pytestmark = pytest.mark.slow


NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_smollm2_chopped_reloads_and_generates(tmp_path):
    model = load_model(NAME).eval()
    tok = AutoTokenizer.from_pretrained(resolve(NAME))
    assert model.config.num_hidden_layers == 30 and sum(p.numel() for p in model.parameters()) == 134_515_008
    plan = chop(model, LayerChop("input", n_keep=15))
    assert plan.kept == [0, *range(16, 30)] and model.config.num_hidden_layers == 15
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = tok(["The capital of Germany is", "Once upon a time, a little"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**x).logits, model(**x).logits, rtol=0, atol=0)
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
    assert torch.equal(reloaded.generate(**x, use_cache=True, **kw), reloaded.generate(**x, use_cache=False, **kw))


def test_dense_smollm2_knows_berlin():
    model = load_model(NAME).eval()
    tok = AutoTokenizer.from_pretrained(resolve(NAME))
    out = model.generate(**tok("The capital of Germany is", return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert "Berlin" in tok.decode(out[0])


def test_short_continued_pretraining_lowers_held_out_loss(tmp_path):
    cfg = yaml.safe_load(open(ROOT / "configs/quickstart.yaml"))
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path)
    path = tmp_path / "q.yaml"
    path.write_text(yaml.safe_dump(cfg))
    common = ["--config", str(path), "--trainer.enable_progress_bar=false", "--data.val_blocks=16",
              "--trainer.limit_val_batches=4", "--data.seq_len=64"]
    before = cli_main(["validate", *common, "--model.export_on_end=false"]).trainer.callback_metrics["val/loss"].item()
    after = cli_main(["fit", *common, "--trainer.max_steps=30", "--trainer.val_check_interval=30",
                      "--model.optim.warmup_steps=5"]).trainer.callback_metrics["val/loss"].item()
    assert after < before - 0.3, (before, after)


def test_smollm2_teaches_its_own_chop(tmp_path):
    """A few distillation steps of the 30 -> 15 chop from the unchopped model: losses finite and falling, teacher fixed."""
    cfg = yaml.safe_load(open(ROOT / "configs/quickstart_distill.yaml"))
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path)
    path = tmp_path / "q.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cli = cli_main(["fit", "--config", str(path), "--trainer.enable_progress_bar=false", "--trainer.max_steps=16",
                    "--trainer.log_every_n_steps=1", "--trainer.val_check_interval=16", "--trainer.limit_val_batches=2",
                    "--trainer.num_sanity_val_steps=0", "--data.seq_len=64", "--data.val_blocks=8",
                    "--model.optim.warmup_steps=2", "--model.export_on_end=false"])
    from helpers import scalars

    tb = scalars(tmp_path / "quickstart_distill")
    for key in ("train/loss", "train/lm", "train/logits", "train/hidden"):
        values = tb[key]
        assert len(values) == 16 and all(torch.isfinite(torch.tensor(values))), (key, values)
        assert sum(values[-4:]) < sum(values[:4]), (key, values)  # falling: the last 4 steps below the first 4
    teacher = cli.model.teacher
    assert teacher.config.num_hidden_layers == 30 and cli.model.model.config.num_hidden_layers == 15
    source = load_model(NAME)
    for k, v in source.state_dict().items():
        assert torch.equal(teacher.state_dict()[k], v), k
