"""Two CPU processes through Lightning's DDP (gloo): every document is trained on exactly once across ranks."""

import json

import pytest

from conftest import write_corpus
from test_training import ROOT, args, run_cli

pytestmark = pytest.mark.slow


def test_ddp_reads_every_document_exactly_once(tmp_path):
    corpus = write_corpus(tmp_path / "c.jsonl", 64)  # 64 documents of exactly one block each (seq_len 8)
    steps = tmp_path / "steps"
    run_cli(*args(tmp_path, "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.max_steps=8",
                  "--data.seq_len=8", f"--data.train_files=[{corpus}]", "--data.val_files=null", "--data.val_docs=0",
                  "--trainer.limit_val_batches=0", callbacks=[("helpers.RecordSteps", {"path": str(steps)})]))
    from transformers import AutoTokenizer

    vocab = {v: k for k, v in AutoTokenizer.from_pretrained(ROOT / "tests/fixtures/tokenizer").get_vocab().items()}
    seen = {}
    for rank in (0, 1):
        rows = [json.loads(line) for line in open(f"{steps}.rank{rank}")]
        assert len(rows) == 8
        seen[rank] = [int(vocab[t][1:]) for r in rows for block in r["ids"] for t in block
                      if vocab[t][0] == "d" and vocab[t][1:].isdigit()]
    assert len(seen[0]) == len(seen[1]) == 32
    assert sorted(seen[0] + seen[1]) == list(range(64))
