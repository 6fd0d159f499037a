"""The Lightning data module of continued pretraining and distillation: ``PackedStream`` per rank and worker, a
held-out set, and the stream position in every checkpoint (see ``chop.data.streaming`` for how the stream is cut)."""

from __future__ import annotations

import itertools
import logging
from typing import Any, Optional

import lightning as L
import torch
from torch.utils.data import DataLoader

from chop import assets
from chop.data.streaming import PackedStream
from chop.data.text import DataError, Source, expand_files, pack_blocks
from chop.models import loading

log = logging.getLogger(__name__)


class StreamingDataModule(L.LightningDataModule):
    """Streams, tokenizes and packs a corpus for continued pretraining; resumable mid-stream.

    Train text: ``train_files`` (local json/jsonl/parquet/text, globs allowed) or a hub dataset ``path``/``config_name``
    (split ``train``). If the hub is unreachable, ``offline`` names one of chop's offline corpora to use instead.
    Validation: ``val_files``, or the hub split ``val_split``, or else the first ``val_docs`` documents of the train
    stream (then excluded from training); at most ``val_blocks`` blocks.
    """

    def __init__(
        self,
        tokenizer: str = "",
        path: Optional[str] = None,
        config_name: Optional[str] = None,
        train_files: Optional[list[str]] = None,
        val_files: Optional[list[str]] = None,
        val_split: Optional[str] = None,
        val_docs: int = 0,
        val_blocks: int = 64,
        offline: Optional[str] = None,
        text_field: str = "text",
        seq_len: int = 2048,
        batch_size: int = 8,
        num_workers: int = 2,
        shuffle_buffer: int = 1000,
        seed: int = 42,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer"])  # the model's hparams hold it already
        self.tokenizer = tokenizer
        if not tokenizer:
            raise ValueError("data.tokenizer: not set (it is linked from model.name; set one of them)")
        if not train_files and not path:
            raise ValueError("data: set data.train_files (local files) or data.path (a hub dataset id)")
        if offline is not None and offline not in assets.OFFLINE_CORPORA:
            raise ValueError(f"data.offline: unknown corpus '{offline}'; known: {sorted(assets.OFFLINE_CORPORA)}")
        if seq_len < 1 or batch_size < 1:
            raise ValueError("data.seq_len and data.batch_size must be positive")
        # Local files are checked now, before any model is loaded.
        self.train_files = expand_files(train_files, "data.train_files")
        self.val_files = expand_files(val_files, "data.val_files")
        self.train: Optional[PackedStream] = None
        self.val: Optional[list[torch.Tensor]] = None
        self._positions: dict[int, list[int]] = {}
        self._next_worker = 0
        self._restored: Optional[dict] = None

    # -- sources ------------------------------------------------------------------------------------------------
    def _sources(self) -> tuple[Source, Optional[Source]]:
        h = self.hparams
        if self.train_files:
            train = Source(files=self.train_files, text_field=h.text_field)
        else:
            if h.offline:  # streaming opens lazily: ask the Hub now whether the dataset is there
                def corpus() -> tuple[Source, Source]:
                    root = assets.OFFLINE_CORPORA[h.offline]()
                    return tuple(Source(files=(str(root / f"{split}.jsonl"),), text_field="text")
                                 for split in ("train", "val"))

                pair = assets.hub_or_offline(f"data: hub dataset '{h.path}' (offline: corpus '{h.offline}')",
                                             lambda: _ask_hub(h.path), corpus, "")
                if pair is not None:
                    return pair
            train = Source(path=h.path, name=h.config_name, split="train", text_field=h.text_field)
        if self.val_files:
            return train, Source(files=self.val_files, text_field=h.text_field)
        if h.val_split:
            return train, Source(path=h.path, name=h.config_name, split=h.val_split, text_field=h.text_field)
        return train, None

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train is not None:
            return
        h = self.hparams
        tokenizer = loading.resolve(self.tokenizer)  # once, here: workers must not each ask the hub
        tok = loading.load_tokenizer(tokenizer)
        if tok.eos_token_id is None:
            raise ValueError(f"data.tokenizer: '{self.tokenizer}' has no EOS token to separate documents")
        train_src, val_src = self._sources()
        if next(iter(train_src.documents()), None) is None:  # fail now on an unreadable source, not in a worker
            raise DataError(f"data: {train_src.files or train_src.path} holds no documents")
        skip = 0 if val_src else h.val_docs
        self.train = PackedStream(train_src, tokenizer, h.seq_len, h.shuffle_buffer, h.seed, skip=skip)
        if self.trainer is not None:
            self.train.rank, self.train.world = self.trainer.global_rank, self.trainer.world_size
        if val_src is None and h.val_docs:
            val_src = train_src
        self.val = self._val_blocks(val_src, tokenizer) if val_src else None

    def _val_blocks(self, src: Source, tokenizer: str) -> list[torch.Tensor]:
        """Pack validation documents in order, until ``val_blocks`` blocks (a whole number per rank)."""
        h = self.hparams
        tok = loading.load_tokenizer(tokenizer)
        docs = src.documents()
        if src is self.train.source:  # the first val_docs rows of the first part, which training skips
            docs = itertools.islice((text for _, text in src.rows(0)), h.val_docs)
        need = h.seq_len + 1
        blocks = pack_blocks(docs, tok, need, h.val_blocks)
        world = self.trainer.world_size if self.trainer is not None else 1
        blocks = blocks[: len(blocks) // world * world]
        if not blocks:
            raise ValueError(f"data: the validation text holds no full block of {need} tokens for {world} rank(s)")
        return blocks

    # -- loaders ------------------------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        assert self.train is not None
        workers = max(1, self.hparams.num_workers)
        if self._restored is not None:
            self._check_restorable(self._restored, workers)
            self.train.resume = {int(k): v for k, v in self._restored["positions"].items()}
            self.train.rotation = self._restored["next_worker"][self.train.rank]
            self._positions = dict(self.train.resume)
            self._next_worker = self.train.rotation
            self._restored = None
        return DataLoader(self.train, batch_size=self.hparams.batch_size, num_workers=self.hparams.num_workers,
                          pin_memory=torch.cuda.is_available(), persistent_workers=False)

    def val_dataloader(self) -> Optional[DataLoader]:
        if not self.val:
            return []  # type: ignore[return-value]
        return DataLoader([{"input_ids": b} for b in self.val], batch_size=self.hparams.batch_size, shuffle=False)

    def calibration_batches(self, n: int) -> list[torch.Tensor]:
        """The first ``n`` batches of training text (as one rank, one worker would see them), for data-driven pruning."""
        if self.train is None:
            self.setup("fit")
        stream = PackedStream(self.train.source, self.train.tokenizer, self.hparams.seq_len, self.hparams.shuffle_buffer,
                              self.hparams.seed, self.train.skip)
        loader = DataLoader(stream, batch_size=self.hparams.batch_size)
        return [b["input_ids"] for _, b in zip(range(n), loader)]

    # -- stream position ----------------------------------------------------------------------------------------
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, dict) and "state" in batch:
            state = batch.pop("state")[-1].tolist()
            self._positions[state[0]] = state[1:]
            workers = max(1, self.hparams.num_workers)
            self._next_worker = (state[0] % workers + 1) % workers
        return batch

    def state_dict(self) -> dict[str, Any]:
        positions, next_worker = dict(self._positions), [self._next_worker]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, (positions, self._next_worker))
            positions = {k: v for p, _ in gathered for k, v in p.items()}
            next_worker = [n for _, n in gathered]
        h = self.hparams
        return {"positions": positions, "next_worker": next_worker, "workers": max(1, h.num_workers),
                "world": len(next_worker), "parts": self.train.parts if self.train else None, "seq_len": h.seq_len, "seed": h.seed, "shuffle_buffer": h.shuffle_buffer,
                "batch_size": h.batch_size}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = state_dict

    def _check_restorable(self, state: dict[str, Any], workers: int) -> None:
        h = self.hparams
        now = {"workers": workers, "world": self.train.world, "parts": self.train.parts, "seq_len": h.seq_len, "seed": h.seed,
               "shuffle_buffer": h.shuffle_buffer, "batch_size": h.batch_size}
        diff = {k: (state.get(k), v) for k, v in now.items() if state.get(k) != v}
        if diff:
            fields = ", ".join(f"{k}: checkpoint {a} vs now {b}" for k, (a, b) in diff.items())
            raise ValueError(f"data: cannot resume the stream position with a different layout ({fields}); "
                             f"use the checkpoint's values (world = devices x nodes, workers = data.num_workers, "
                             f"parts = the corpus's files)")


def _ask_hub(path: Optional[str]) -> None:
    """Raises unless the Hub answers for dataset ``path``."""
    from huggingface_hub import dataset_info

    dataset_info(path, timeout=10)
