"""Text sources without a trainer: local files or a hub dataset, read part by part as (row, text) with errors that
name the file and row; file globs; and packing documents into token blocks. ``chop prune`` and ``chop eval`` read
text through this module alone, so they start without Lightning."""

from __future__ import annotations

import glob
import itertools
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch

# File suffix -> the `datasets` builder that reads it: chop's one such map (training text, eval and classification files).
BUILDERS = {".json": "json", ".jsonl": "json", ".gz": "json", ".parquet": "parquet", ".txt": "text", ".csv": "csv"}


class DataError(ValueError):
    """A document source that cannot be read as text: the message names the file (or dataset) and the row."""


def builder_of(path: Union[str, Path], field: str) -> str:
    """The ``datasets`` builder for a file, by its suffix; an error naming ``field`` for a suffix it cannot read."""
    builder = BUILDERS.get(Path(path).suffix)
    if builder is None:
        raise DataError(f"{field}: cannot read '{path}': use one of {sorted(BUILDERS)} files")
    return builder


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
            builder = builder_of(self.files[part], "data")
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


def started(texts: Iterator[str]) -> Iterator[str]:
    """``texts`` with its first item already read, so that a source that cannot be read (the Hub did not answer)
    fails here rather than where the texts are used."""
    return itertools.chain([next(texts)], texts)


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
