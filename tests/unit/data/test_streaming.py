"""Streaming data: every document exactly once across ranks x workers, lossless packing, exact resume, bad input."""

import itertools
import json

import pytest
import torch
from helpers import write_corpus

from chop.data.streaming import PackedStream
from chop.data.text import Source
from chop.models.loading import load_tokenizer
from chop.training.pretraining_data import StreamingDataModule


def doc_ids(blocks, tok):
    """Document numbers (tokens 'd<i>') in a list of blocks."""
    vocab = {v: k for k, v in tok.get_vocab().items()}
    return [int(vocab[t][1:]) for b in blocks for t in b.tolist() if vocab[t][0] == "d" and vocab[t][1:].isdigit()]


def dm(tokenizer_dir, corpus, **kw):
    args = dict(tokenizer=str(tokenizer_dir), train_files=[str(corpus)], seq_len=8, batch_size=4, num_workers=2,
                shuffle_buffer=5, val_docs=0)
    args.update(kw)
    return StreamingDataModule(**args)


@pytest.mark.parametrize("world,workers", [(1, 1), (2, 2), (3, 2)])
def test_every_document_exactly_once_across_ranks_and_workers(tokenizer_dir, tmp_path, world, workers):
    n_docs = 4 * world * workers * 3
    corpus = write_corpus(tmp_path / "c.jsonl", n_docs)  # each document is exactly one block of 9 tokens
    tok = load_tokenizer(str(tokenizer_dir))
    seen = []
    for rank in range(world):
        data = dm(tokenizer_dir, corpus, num_workers=workers if workers > 1 else 0)
        data.setup()
        data.train.rank, data.train.world = rank, world
        per_rank = n_docs // world // 4  # batches of 4 blocks in one pass
        for batch in itertools.islice(data.train_dataloader(), per_rank):
            data.on_before_batch_transfer(batch, 0)
            seen += doc_ids(batch["input_ids"], tok)
    assert sorted(seen) == list(range(n_docs))


def test_packing_keeps_every_token_in_order(tokenizer_dir, corpus):
    tok = load_tokenizer(str(tokenizer_dir))
    stream = PackedStream(Source(files=(str(corpus),)), str(tokenizer_dir), seq_len=6, shuffle_buffer=1)
    expected = []
    for line in open(corpus):
        expected += tok(json.loads(line)["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    blocks = [b["input_ids"] for b in itertools.islice(iter(stream), len(expected) // 7)]
    assert all(len(b) == 7 for b in blocks)
    assert torch.cat(blocks).tolist() == expected[: 7 * len(blocks)]


def test_shuffle_is_seeded(tokenizer_dir, corpus):
    def first(seed):
        s = PackedStream(Source(files=(str(corpus),)), str(tokenizer_dir), seq_len=8, shuffle_buffer=16, seed=seed)
        return [b["input_ids"][0].item() for b in itertools.islice(iter(s), 16)]

    assert first(1) == first(1) != first(2)
    assert sorted(first(1)) == sorted(first(2))  # a permutation within the window


@pytest.mark.parametrize("consumed", [5, 6, 13])
def test_resume_continues_with_the_next_unseen_batch(tokenizer_dir, corpus, consumed):
    total = 30  # crosses the end of the corpus, so the second pass (new shuffle) is resumed too
    straight = dm(tokenizer_dir, corpus, seq_len=6)
    straight.setup()
    expected = [b["input_ids"] for b in itertools.islice(straight.train_dataloader(), total)]

    first = dm(tokenizer_dir, corpus, seq_len=6)
    first.setup()
    loader = iter(first.train_dataloader())
    for _ in range(consumed):
        first.on_before_batch_transfer(next(loader), 0)
    next(loader)  # Lightning prefetches one batch that training never sees before the checkpoint
    state = json.loads(json.dumps(first.state_dict()))  # survives a round trip through a checkpoint

    resumed = dm(tokenizer_dir, corpus, seq_len=6)
    resumed.load_state_dict(state)
    resumed.setup()
    rest = [b["input_ids"] for b in itertools.islice(resumed.train_dataloader(), total - consumed)]
    for a, b in zip(expected[consumed:], rest, strict=True):
        assert torch.equal(a, b)


def test_resume_with_another_layout_is_refused(tokenizer_dir, corpus):
    first = dm(tokenizer_dir, corpus)
    first.setup()
    state = first.state_dict()
    other = dm(tokenizer_dir, corpus, num_workers=3)
    other.load_state_dict(state)
    other.setup()
    with pytest.raises(ValueError, match="workers: checkpoint 2 vs now 3"):
        other.train_dataloader()


def test_validation_documents_are_held_out(tokenizer_dir, tmp_path):
    corpus = write_corpus(tmp_path / "c.jsonl", 40)
    tok = load_tokenizer(str(tokenizer_dir))
    data = dm(tokenizer_dir, corpus, val_docs=8, num_workers=0, val_blocks=100)
    data.setup()
    assert sorted(doc_ids(data.val, tok)) == list(range(8))
    train = list(itertools.islice(data.train_dataloader(), 8))  # one pass: 32 blocks
    assert sorted(doc_ids([b for x in train for b in x["input_ids"]], tok)) == list(range(8, 40))


def test_held_out_files(tokenizer_dir, tmp_path):
    train = write_corpus(tmp_path / "train.jsonl", 32)
    val = write_corpus(tmp_path / "val.jsonl", 8, start=100)
    tok = load_tokenizer(str(tokenizer_dir))
    data = dm(tokenizer_dir, train, val_files=[str(val)], num_workers=0)
    data.setup()
    assert sorted(doc_ids(data.val, tok)) == list(range(100, 108))


def test_missing_file_names_the_field(tokenizer_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="data.train_files: no file matches .*nope.jsonl"):
        dm(tokenizer_dir, tmp_path / "nope.jsonl")


def test_missing_text_field_names_the_field(tokenizer_dir, tmp_path):
    corpus = write_corpus(tmp_path / "c.jsonl", 8, field="body")
    data = dm(tokenizer_dir, corpus)
    with pytest.raises(KeyError, match=r"data.text_field: .*no field 'text' \(fields: \['body'\]\)"):
        data.setup()


def test_text_and_parquet_files(tokenizer_dir, tmp_path):
    pa = pytest.importorskip("pyarrow.parquet")
    import pyarrow

    texts = [f"d{i} the cat sat" for i in range(12)]
    (tmp_path / "c.txt").write_text("\n".join(texts) + "\n")
    pa.write_table(pyarrow.table({"text": texts}), tmp_path / "c.parquet")
    for name in ("c.txt", "c.parquet"):
        assert list(Source(files=(str(tmp_path / name),)).documents()) == texts


def test_too_small_corpus_for_the_shards(tokenizer_dir, tmp_path):
    corpus = write_corpus(tmp_path / "c.jsonl", 1)
    data = dm(tokenizer_dir, corpus, num_workers=0)
    data.setup()
    data.train.rank, data.train.world = 1, 2
    with pytest.raises(RuntimeError, match="shard 1 of 2 .* got no full block"):
        next(iter(data.train_dataloader()))


def test_with_enough_files_each_shard_reads_only_its_own(tokenizer_dir, tmp_path, monkeypatch):
    files = [str(write_corpus(tmp_path / f"c{i}.jsonl", 12, start=12 * i)) for i in range(6)]
    opened = []
    real = Source.open
    monkeypatch.setattr(Source, "open", lambda self, part: opened.append(part) or real(self, part))
    tok = load_tokenizer(str(tokenizer_dir))
    seen, per_shard = [], {}
    for rank in range(2):
        for worker in range(3):  # 2 ranks x 3 workers = 6 shards, one file each per epoch
            data = dm(tokenizer_dir, files[0], num_workers=0)
            data.hparams.train_files = None
            data.train_files = tuple(files)
            data.setup()
            data.train.rank, data.train.world = rank * 3 + worker, 6  # one worker per "rank": the same split
            opened.clear()
            blocks = [b["input_ids"] for b in itertools.islice(iter(data.train), 12)]
            per_shard[(rank, worker)] = set(opened)
            seen += doc_ids(blocks, tok)
    assert sorted(seen) == list(range(72))  # every document of the epoch exactly once
    assert all(len(parts) == 1 for parts in per_shard.values())  # each shard opened one file, not all six
    assert len(set().union(*per_shard.values())) == 6


def test_resume_opens_only_the_part_it_stopped_in(tokenizer_dir, tmp_path, monkeypatch):
    files = tuple(str(write_corpus(tmp_path / f"c{i}.jsonl", 12, start=12 * i)) for i in range(10))
    stream = PackedStream(Source(files=files), str(tokenizer_dir), seq_len=8, shuffle_buffer=5)
    blocks = list(itertools.islice(iter(stream), 120))  # one epoch: 10 files of 12 one-block documents
    for at in (12, 108):  # 10% and 90% through the epoch
        resumed = PackedStream(Source(files=files), str(tokenizer_dir), seq_len=8, shuffle_buffer=5)
        resumed.resume = {0: blocks[at - 1]["state"][1:].tolist()}
        opened = []
        real = Source.open
        monkeypatch.setattr(Source, "open", lambda self, part: opened.append(part) or real(self, part))
        first = next(iter(resumed))
        monkeypatch.undo()
        assert torch.equal(first["input_ids"], blocks[at]["input_ids"])
        # The part it stopped in (entered at its window's row) and, when that was used up, the next: never the rest.
        assert len(opened) <= 2, opened


def test_file_order_is_shuffled_every_epoch(tokenizer_dir, tmp_path):
    files = tuple(str(write_corpus(tmp_path / f"c{i}.jsonl", 2, start=2 * i)) for i in range(8))
    stream = PackedStream(Source(files=files), str(tokenizer_dir), seq_len=8, shuffle_buffer=1)
    tok = load_tokenizer(str(tokenizer_dir))
    ids = doc_ids([b["input_ids"] for b in itertools.islice(iter(stream), 32)], tok)
    first, second = ids[:16], ids[16:]
    assert sorted(first) == sorted(second) == list(range(16)) and first != second and first != list(range(16))


@pytest.mark.parametrize("content,match", [
    (b"", "holds no documents"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" * 20, r"cannot read '.*bad.jsonl' after row 0 .*UTF-8"),
    ("".join(json.dumps({"text": f"d{i} the cat"}) + "\n" for i in range(150)).encode() + b'{"text": null}\n',
     r"'.*bad.jsonl' row 150: 'text' is None, not text"),
])
def test_unreadable_documents_name_the_file_and_row(tokenizer_dir, tmp_path, content, match):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content)
    data = dm(tokenizer_dir, bad, num_workers=0)
    with pytest.raises(ValueError, match=match):
        data.setup()
        list(itertools.islice(iter(data.train), 100))  # row 150 is in the 67th block
