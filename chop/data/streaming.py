"""Stream a pretraining corpus, tokenize on the fly, pack into fixed blocks, and resume mid-stream.

Documents come from Hugging Face ``datasets`` in streaming mode: a hub dataset or local json/jsonl/parquet/text
files, read part by part (a part is one local file or one of the hub dataset's data files). Each of the
``ranks * workers`` shards reads only its own parts when there are at least as many parts as shards (every epoch
deals the parts, in a new seeded order, round-robin to the shards); with fewer parts, every shard reads them all and
keeps every ``ranks * workers``-th document. Each shard shuffles its documents in windows of ``shuffle_buffer`` (a
seeded permutation per window and epoch), tokenizes them, appends EOS and packs the tokens into ``seq_len + 1``
blocks with no padding. The stream is endless (a new shuffle each pass), so training is bounded by ``max_steps``.

Every block carries the position of its shard after it (epoch, part, first row of its window, document in the
window, token offset). The data module keeps the position of the last block that training consumed, per shard, and
Lightning saves it in the checkpoint: a resumed run opens that part at that row (other parts are not read) and
continues with the next unseen block.
"""

from __future__ import annotations

import glob
import itertools
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from chop import assets
from chop.models import loading

log = logging.getLogger(__name__)

BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text", ".gz": "json"}


class DataError(ValueError):
    """A document source that cannot be read as text: the message names the file (or dataset) and the row."""


@dataclass(frozen=True)
class Source:
    """Where documents come from: local files (``files``) or a hub dataset (``path``, ``name``, ``split``)."""

    files: Optional[tuple[str, ...]] = None
    path: Optional[str] = None
    name: Optional[str] = None
    split: str = "train"
    text_field: str = "text"

    def _hub(self) -> Any:
        import datasets

        return datasets.load_dataset(self.path, self.name, split=self.split, streaming=True)

    def num_parts(self) -> int:
        """Local files, or the hub dataset's data files: the units that shards can read without each other."""
        return len(self.files) if self.files else self._hub().num_shards

    def where(self, part: int) -> str:
        return f"'{self.files[part]}'" if self.files else f"{self.path} ({self.name}, {self.split}) data file {part}"

    def open(self, part: int) -> Any:
        import datasets

        if self.files:
            builder = BUILDERS.get(Path(self.files[part]).suffix)
            if builder is None:
                raise DataError(f"data: cannot read '{self.files[part]}': use one of {sorted(BUILDERS)} files")
            return datasets.load_dataset(builder, data_files=[self.files[part]], split="train", streaming=True)
        hub = self._hub()
        return hub.shard(num_shards=hub.num_shards, index=part)

    def rows(self, part: int, start: int = 0) -> Iterator[tuple[int, str]]:
        """(row, text) of part ``part`` from row ``start`` on; unreadable files, a missing field and rows that are
        not text are errors naming the file and row."""
        if self.files and os.path.getsize(self.files[part]) == 0:
            return  # datasets cannot open an empty file; it holds no documents
        ds = self.open(part)
        if start:
            ds = ds.skip(start)
        row, batches = start, ds.iter(batch_size=256)  # .iter(): not split across dataloader workers behind our back
        while True:
            try:
                batch = next(batches, None)
            except Exception as err:  # pyarrow, json and Unicode errors say neither the file nor what to do
                raise DataError(f"data: cannot read {self.where(part)} after row {row} ({type(err).__name__}: "
                                f"{str(err)[:300]}); it must be UTF-8 text in the format its name says") from err
            if batch is None:
                return
            if self.text_field not in batch:
                raise KeyError(f"data.text_field: documents of {self.where(part)} have no field '{self.text_field}' "
                               f"(fields: {sorted(batch)}); set data.text_field to one of them")
            for text in batch[self.text_field]:
                if not isinstance(text, str):
                    raise DataError(f"data: {self.where(part)} row {row}: '{self.text_field}' is {text!r}, not text; "
                                    f"fix or drop that row")
                yield row, text
                row += 1

    def documents(self) -> Iterator[str]:
        """Every document's text, part after part, in order."""
        for part in range(self.num_parts()):
            for _, text in self.rows(part):
                yield text


def expand_files(files: Union[str, list[str], None], field: str) -> Optional[tuple[str, ...]]:
    """Expand globs; a pattern that matches nothing is an error naming the config field."""
    if not files:
        return None
    out: list[str] = []
    for pattern in [files] if isinstance(files, str) else files:
        matched = sorted(glob.glob(os.path.expanduser(pattern)))
        if not matched:
            raise FileNotFoundError(f"{field}: no file matches '{pattern}'; check the path (relative to {os.getcwd()})")
        out.extend(matched)
    return tuple(out)


class PackedStream(IterableDataset):
    """Endless packed token blocks of one rank, split across its dataloader workers (see module docstring).

    ``skip``: the first ``skip`` rows of part 0, held out for validation.
    """

    def __init__(self, source: Source, tokenizer: str, seq_len: int, shuffle_buffer: int = 1000, seed: int = 42,
                 skip: int = 0) -> None:
        self.source, self.tokenizer, self.seq_len = source, tokenizer, seq_len
        self.shuffle_buffer, self.seed, self.skip = max(1, shuffle_buffer), seed, skip
        self.rank, self.world = 0, 1
        self.resume: dict[int, list[int]] = {}  # shard -> [epoch, part index, window row, doc, token offset]
        self.rotation = 0  # which logical shard worker 0 plays, so that resumed batches keep their order
        self.parts = source.num_parts()

    def my_parts(self, epoch: int, shard: int, num_shards: int) -> tuple[list[int], bool]:
        """The parts this shard reads in ``epoch`` (in order), and whether it reads them whole (else it keeps every
        ``num_shards``-th document of each)."""
        order = np.random.default_rng([self.seed, epoch]).permutation(self.parts).tolist()
        if self.parts >= num_shards:
            return order[shard::num_shards], True
        return order, False

    def windows(self, part: int, start: int, shard: int, num_shards: int, whole: bool) -> Iterator[tuple[int, list[str]]]:
        """(first row, texts) of this shard's windows of ``shuffle_buffer`` documents of ``part``, from row ``start``."""
        window: list[str] = []
        first = start
        for row, text in self.source.rows(part, start):
            if not window:
                first = row
            if (part == 0 and row < self.skip) or not (whole or (row + part) % num_shards == shard):
                continue
            window.append(text)
            if len(window) == self.shuffle_buffer:
                yield first, window
                window = []
        if window:
            yield first, window

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        shard = self.rank * workers + (worker + self.rotation) % workers
        num_shards = self.world * workers
        tok = loading.load_tokenizer(self.tokenizer)
        eos = tok.eos_token_id
        epoch, start_p, start_row, start_d, start_t = self.resume.get(shard, [0, 0, 0, 0, 0])
        resumed = shard in self.resume
        block: list[int] = []
        need = self.seq_len + 1
        while True:
            produced = False
            parts, whole = self.my_parts(epoch, shard, num_shards)
            for p in range(start_p, len(parts)):
                for row, window in self.windows(parts[p], start_row, shard, num_shards, whole):
                    order = np.random.default_rng([self.seed, epoch, shard, parts[p], row]).permutation(len(window))
                    texts = [window[k] for k in order[start_d:]]
                    ids_list = tok(texts, add_special_tokens=False)["input_ids"] if texts else []
                    for d, ids in enumerate(ids_list, start=start_d):
                        ids = ids + [eos]
                        t = start_t
                        start_t = 0
                        while t < len(ids):
                            take = min(need - len(block), len(ids) - t)
                            block.extend(ids[t:t + take])
                            t += take
                            if len(block) == need:
                                produced = True
                                pos = [epoch, p, row, d, t] if t < len(ids) else [epoch, p, row, d + 1, 0]
                                yield {"input_ids": torch.tensor(block), "state": torch.tensor([shard, *pos])}
                                block = []
                    start_d = 0
                start_row = 0
            if not produced and not resumed:
                raise RuntimeError(
                    f"data: shard {shard} of {num_shards} (ranks x workers) got no full block of {need} tokens in a "
                    f"whole pass; the corpus is too small for this many ranks/workers or this seq_len"
                )
            epoch, start_p, block, resumed = epoch + 1, 0, [], False


def pack_blocks(texts: Iterable[str], tok: Any, length: int, n_blocks: int) -> list[torch.Tensor]:
    """The first ``n_blocks`` blocks of ``length`` tokens of ``texts`` in order, documents separated by EOS: the
    held-out blocks whose token perplexity Just CHOP reports (validation in training, the ``c4`` eval task)."""
    buf: list[int] = []
    blocks: list[torch.Tensor] = []
    for text in texts:
        buf.extend(tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
        while len(buf) >= length and len(blocks) < n_blocks:
            blocks.append(torch.tensor(buf[:length]))
            buf = buf[length:]
        if len(blocks) == n_blocks:
            break
    return blocks


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
        elif h.offline and (loading.hub_offline() or not _hub_reachable(h.path, h.config_name)):
            log.warning("data: hub dataset %s unreachable; using chop's offline corpus '%s'", h.path, h.offline)
            root = assets.OFFLINE_CORPORA[h.offline]()
            train = Source(files=(str(root / "train.jsonl"),), text_field="text")
            return train, Source(files=(str(root / "val.jsonl"),), text_field="text")
        else:
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


def _hub_reachable(path: Optional[str], name: Optional[str]) -> bool:
    try:
        from huggingface_hub import dataset_info

        dataset_info(path, timeout=10)
        return True
    except Exception:
        return False
