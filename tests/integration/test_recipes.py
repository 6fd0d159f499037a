"""Every recipe and config parses; the hub recipe runs with its hub loading pointed at local copies."""

import datasets
import pytest
import yaml
from helpers import ROOT, TINY, make_tokenizer, tiny_llama, write_corpus

from chop.models import loading
from chop.training.cli import cli_main

YAMLS = sorted(str(p.relative_to(ROOT)) for p in [*ROOT.glob("recipes/**/*.yaml"), *ROOT.glob("configs/*.yaml")]
               if p.name != "study.yaml")  # the study's arms: test_every_study_arm_is_a_config_chop_fit_accepts


@pytest.mark.parametrize("path", YAMLS)
def test_config_parses(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = yaml.safe_load(open(path))
    if "pruning" in cfg:  # a `python -m chop prune` config
        from chop.pruning.prune_cli import parse
        from chop.pruning.registry import pruner_class

        args = parse(["--config", path])
        assert isinstance(args["pruning"], pruner_class(cfg["pruning"].get("method", "surgeon")))
        assert args["pruning"].sparsity == cfg["pruning"]["sparsity"]
        return
    assert cfg["model"]["class_path"].startswith("chop.")
    with pytest.raises(SystemExit) as done:
        cli_main(["fit", "--config", path, "--print_config"])
    assert done.value.code == 0


@pytest.mark.parametrize("recipe", ["llama2_7b_layerchop_input", "llama2_7b_layerchop_input_distill"])
def test_llama2_recipe_runs_with_local_sources(tmp_path, monkeypatch, recipe):
    """The paper recipe, shrunk to the CPU: the hub ids resolve to a tiny local Llama and local C4-like files."""
    model_dir = tiny_llama(tmp_path / "llama", layers=32)
    train, val = write_corpus(tmp_path / "c4-train.jsonl", 200), write_corpus(tmp_path / "c4-val.jsonl", 20, start=500)
    real_resolve, real_load = loading.resolve, datasets.load_dataset
    monkeypatch.setattr(loading, "resolve", lambda n: str(model_dir) if n == "meta-llama/Llama-2-7b-hf" else real_resolve(n))

    def local_c4(path, name=None, split=None, **kw):
        if path == "allenai/c4":
            return real_load("json", data_files=str(train if split == "train" else val), split="train", **kw)
        return real_load(path, name, split=split, **kw)

    monkeypatch.setattr(datasets, "load_dataset", local_c4)
    cli = cli_main(["fit", "--config", str(ROOT / f"recipes/just_chop/{recipe}.yaml"),
                    "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto",
                    "--trainer.precision=32-true", "--trainer.max_steps=2", "--trainer.accumulate_grad_batches=1",
                    "--trainer.limit_val_batches=1", "--trainer.val_check_interval=2", "--trainer.enable_progress_bar=false",
                    f"--trainer.logger.init_args.save_dir={tmp_path}", "--data.seq_len=16", "--data.num_workers=0",
                    "--data.val_blocks=4", "--data.shuffle_buffer=10"])
    model = cli.model.model
    assert model.config.num_hidden_layers == 16
    assert cli.model.plan.kept == [0, *range(17, 32)]
    assert cli.trainer.global_step == 2  # the recipe's FLOP budget is far away for a tiny model: max_steps ends it
    assert "val/loss" in cli.trainer.callback_metrics
    if recipe.endswith("distill"):
        assert cli.model.teacher.config.num_hidden_layers == 32 and cli.model.layer_map == cli.model.plan.kept
        assert {"train/logits", "train/hidden"} <= set(cli.trainer.callback_metrics)


@pytest.mark.parametrize("recipe, arch, n_layers", [("opt_1.3b_sst2", "opt", 24), ("gpt2_xl_sst2", "gpt2", 48)])
def test_why_lift_so_heavy_recipe_runs_with_local_sources(tmp_path, monkeypatch, recipe, arch, n_layers):
    """The prompt-classification recipes, shrunk to the CPU: a tiny local model of the paper's depth and SST-2-like
    rows in the hub's columns (sentence, label) where the hub ids would load."""
    hub = {"opt": "facebook/opt-1.3b", "gpt2": "openai-community/gpt2-xl"}[arch]
    model_dir = tmp_path / arch
    make_tokenizer(model_dir)
    depth = {"n_layer": n_layers} if arch == "gpt2" else {"num_hidden_layers": n_layers}
    loading.load_model(config={**TINY[arch], "vocab_size": 1100, **depth}).save_pretrained(model_dir)
    real_resolve, real_load = loading.resolve, datasets.load_dataset
    monkeypatch.setattr(loading, "resolve", lambda n: str(model_dir) if n == hub else real_resolve(n))
    fixture = ROOT / "tests" / "fixtures" / "classify"

    def local_sst2(path, name=None, split=None, **kw):
        if path == "stanfordnlp/sst2":
            files = str(fixture / ("train.jsonl" if split == "train" else "test.jsonl"))
            return real_load("json", data_files=files, split="train").rename_column("text", "sentence")
        return real_load(path, name, split=split, **kw)

    monkeypatch.setattr(datasets, "load_dataset", local_sst2)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # the hub path, answered locally
    cli = cli_main(["fit", "--config", str(ROOT / f"recipes/why_lift_so_heavy/{recipe}.yaml"),
                    "--trainer.accelerator=cpu", "--trainer.precision=32-true", "--trainer.max_steps=3",
                    "--trainer.val_check_interval=3", "--trainer.limit_val_batches=2",
                    "--trainer.enable_progress_bar=false", f"--trainer.logger.init_args.save_dir={tmp_path}",
                    "--data.num_workers=0", '--data.verbalizer={"negative": " a", "positive": " good"}'])
    assert cli.model.plan.kept == [0, 1]
    assert cli.trainer.global_step == 3 and {"val/acc", "val/f1", "train/loss"} <= set(cli.trainer.callback_metrics)


def test_every_study_arm_is_a_config_chop_fit_accepts(tmp_path, monkeypatch):
    """recipes/study_smollm2: base.yaml plus each recovery arm's settings (the best placement stood in by `input`)
    parses as a `chop fit` config; each pruning arm is settings a pruner accepts; the reference arm takes none."""
    import importlib.util

    from chop.pruning.registry import pruner_from

    monkeypatch.chdir(ROOT)
    spec = importlib.util.spec_from_file_location("study_run", ROOT / "recipes" / "study_smollm2" / "run.py")
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    study = run.Study(ROOT / "recipes" / "study_smollm2" / "study.yaml", tmp_path)
    monkeypatch.setattr(study, "best", lambda section: {"strategy": "input", "fraction": 0.5})
    for section in study.spec["sections"].values():
        for arm, how in section["arms"].items():
            if "prune" in how:
                pruner_from(how["prune"])
                continue
            if "eval" in how:  # the dense reference: the model itself through chop eval
                assert how["eval"] == {}
                continue
            path = tmp_path / f"{run.slug(arm)}.yaml"
            path.write_text(yaml.safe_dump(study.config(how["fit"], 0, tmp_path / "x" / "seed0")))
            with pytest.raises(SystemExit) as done:
                cli_main(["fit", "--config", str(path), "--print_config"])
            assert done.value.code == 0, arm
