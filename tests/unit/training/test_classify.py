"""Prompt-based classification ("Why Lift so Heavy?"): verbalizer scoring, learning, few-shot sampling, bad input."""

import json
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import FIX, ROOT, TINY

from chop.data.classification import few_shot
from chop.models.loading import load_model, load_tokenizer
from chop.models.registry import output_head
from chop.training.classification_data import ClassificationDataModule
from chop.training.classify import PromptClassification, verbalizer_scores
from chop.training.cli import cli_main

CONFIG = ROOT / "configs" / "tiny_cpu_classify.yaml"


def config(tmp_path, **model_args):
    cfg = yaml.safe_load(open(CONFIG))
    cfg["model"]["init_args"].update(tokenizer=str(FIX / "tokenizer"), **model_args)
    cfg["data"]["init_args"].update(train_files=[str(FIX / "classify" / "train.jsonl")],
                                    test_files=[str(FIX / "classify" / "test.jsonl")])
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def datamodule(**kwargs):
    args = dict(tokenizer=str(FIX / "tokenizer"), train_files=[str(FIX / "classify" / "train.jsonl")],
                template="{text} it was", verbalizer={"negative": " a", "positive": " good"})
    return ClassificationDataModule(**{**args, **kwargs})


@pytest.mark.parametrize("words", [[[5], [9], [30]], [[5, 7], [9], [30, 31, 2]]], ids=["one-token", "multi-token"])
def test_verbalizer_scores_equal_a_hand_computation(words):
    torch.manual_seed(0)
    model = load_model(config=TINY["llama"]).eval()
    prompts = [[1, 4, 8, 9, 10], [1, 20], [1, 3, 3, 3, 3, 3, 3, 7]]
    lengths = torch.tensor([len(p) for p in prompts])
    ids = torch.zeros(len(prompts), int(lengths.max()), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = torch.tensor(p)
    with torch.no_grad():
        got = verbalizer_scores(lambda x: model.base_model(input_ids=x).last_hidden_state, output_head(model), ids,
                                lengths, words)
        for b, p in enumerate(prompts):
            for c, w in enumerate(words):
                logp = F.log_softmax(model(torch.tensor([p + w])).logits[0].double(), -1)
                hand = sum(logp[len(p) - 1 + j, t].item() for j, t in enumerate(w))
                assert got[b, c].item() == pytest.approx(hand, abs=1e-4)


@pytest.mark.parametrize("head", ["verbalizer", "linear"])
def test_a_tiny_model_learns_a_separable_dataset(tmp_path, head):
    path = config(tmp_path, head=head)
    fit = cli_main(["fit", "--config", path])
    assert fit.model.plan.kept == [0, 1]  # the bottom two of six layers
    ckpt = next((tmp_path / "tiny_cpu_classify" / "checkpoints").glob("epoch=*.ckpt"))
    test = cli_main(["test", "--config", path, "--ckpt_path", str(ckpt)])
    metrics = test.trainer.callback_metrics
    assert metrics["test/acc"] >= 0.95 and metrics["test/f1"] >= 0.95
    # Before training (the same random init) it is at chance: the accuracy above was learned.
    untrained = cli_main(["test", "--config", path])
    assert untrained.trainer.callback_metrics["test/acc"] < 0.8
    # The export holds what was trained: a linear head's weights beside the model, with the class order and prompt.
    hf = tmp_path / "tiny_cpu_classify" / "checkpoints" / "hf"
    assert (hf / "classifier.safetensors").exists() == (head == "linear")
    if head == "linear":
        from safetensors.torch import load_file

        saved = torch.load(tmp_path / "tiny_cpu_classify" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        exported = load_file(hf / "classifier.safetensors")
        assert torch.equal(exported["weight"], saved["classifier.weight"]) and torch.equal(exported["bias"], saved["classifier.bias"])
        assert json.loads((hf / "classifier.json").read_text())["classes"] == fit.datamodule.labels


def test_few_shot_sampling_is_balanced_and_reproducible():
    labels = [i % 3 for i in range(300)]
    a, b, c = few_shot(labels, 8, seed=1), few_shot(labels, 8, seed=1), few_shot(labels, 8, seed=2)
    assert a == b and a != c and len(set(a)) == 24
    assert Counter(labels[i] for i in a) == {0: 8, 1: 8, 2: 8}
    with pytest.raises(ValueError, match="class 2 has only 1"):
        few_shot([0, 0, 1, 1, 2], 2, seed=0)


def test_few_shot_data_and_a_held_out_split_by_seed():
    dm = datamodule(shots=4, holdout=0.25, seed=3)
    dm.setup()
    assert Counter(e["label"] for e in dm.train) == {0: 4, 1: 4} and len(dm.test) == 50
    again = datamodule(shots=4, holdout=0.25, seed=3)
    again.setup()
    assert again.train == dm.train and again.test == dm.test
    other = datamodule(shots=4, holdout=0.25, seed=4)
    other.setup()
    assert other.train != dm.train
    tok = load_tokenizer(str(FIX / "tokenizer"))
    text = json.loads(open(FIX / "classify" / "train.jsonl").readline())["text"]
    assert dm._encode({"text": text, "label": 0})["input_ids"] == tok.encode(f"{text} it was")
    assert dm.word_ids == [tok.encode(" a", add_special_tokens=False), tok.encode(" good", add_special_tokens=False)]


def test_long_texts_are_cut_and_the_template_end_is_kept():
    dm = datamodule(max_length=6)
    dm.setup()
    tok = load_tokenizer(str(FIX / "tokenizer"))
    ids = dm._encode({"text": "the cat sat on the mat far away", "label": 0})["input_ids"]
    assert len(ids) == 6 and ids[-2:] == tok.encode(" it was", add_special_tokens=False)


def test_offline_sst2_is_split_into_train_and_held_out_test():
    dm = ClassificationDataModule(tokenizer="HuggingFaceTB/SmolLM2-135M-Instruct", dataset="sst2", shots=16,
                                  template="{text} It was", verbalizer={"negative": " terrible", "positive": " great"})
    dm.setup()
    assert len(dm.train) == 32 and len(dm.test) == 436  # half of the 872 validation sentences held out
    assert Counter(e["label"] for e in dm.train) == {0: 16, 1: 16}


@pytest.mark.parametrize("kwargs, message", [
    (dict(template="Review: it was"), "no {text} placeholder"),
    (dict(template="{text} {label}:"), "only the {text} placeholder"),
    (dict(verbalizer={"negative": " a"}), "at least two"),
    (dict(verbalizer={"negative": " a", "positive": " a"}), "share a word"),
    (dict(shots=0), "data.shots"),
    (dict(holdout=1.5), "data.holdout"),
])
def test_bad_settings_are_refused_when_the_config_is_read(kwargs, message):
    with pytest.raises(ValueError, match=message):
        datamodule(**kwargs)


@pytest.mark.parametrize("verbalizer, message", [
    ({"negative": " a", "postive": " good"}, "label 'positive', which the verbalizer does not map"),
    ({"negative": " a", "positive": " zebra"}, "word ' zebra' for label 'positive' is not in the tokenizer"),
    ({"negative": " a", "positive": " good", "neutral": " the"}, r"no training example has the label\(s\) \['neutral'\]"),
])
def test_unknown_labels_and_words_are_refused_before_training(verbalizer, message):
    with pytest.raises(ValueError, match=message):
        datamodule(verbalizer=verbalizer).setup()


def test_an_unknown_head_is_refused():
    with pytest.raises(ValueError, match="model.head"):
        PromptClassification(config=TINY["llama"], head="mlp")


@pytest.mark.parametrize("model_args, message", [
    (dict(pruning={"method": "obd"}), "model.pruning: obd needs calibration text, which ClassificationDataModule"),
    (dict(chop={"strategy": "block_influence", "n_keep": 2}), "model.chop.strategy: block_influence needs calibration"),
])
def test_pruning_that_needs_calibration_text_is_refused_before_the_model_loads(tmp_path, monkeypatch, model_args, message):
    """Classification data has no calibration stream: a data-driven pruner or chop is refused as the run starts."""
    monkeypatch.setattr(PromptClassification, "load_source", lambda self: pytest.fail("the model was loaded"))
    with pytest.raises(ValueError, match=message):
        cli_main(["fit", "--config", config(tmp_path, **model_args)])


def test_magnitude_pruning_needs_no_calibration_and_trains_the_smaller_classifier(tmp_path):
    cli = cli_main(["fit", "--config", config(tmp_path, pruning={"method": "magnitude", "sparsity": 0.3, "align": 4}),
                    "--trainer.max_epochs=1"])
    report = cli.model.pruning_report
    assert report.method == "magnitude" and report.params_after < report.params_before
