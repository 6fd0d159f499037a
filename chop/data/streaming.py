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

import logging
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from chop.data.text import Source
from chop.models import loading

log = logging.getLogger(__name__)

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
