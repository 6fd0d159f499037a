"""`chop eval` end to end: the table and JSON it writes, no Lightning loaded, tokenisation in threads."""

import json
import subprocess
import sys

import pytest
from helpers import EVAL_FIX

from chop.cli import main


def test_chop_eval_prints_a_table_and_writes_json(tmp_path, eval_model, eval_tokenizer):
    eval_model.save_pretrained(tmp_path / "m")
    eval_tokenizer.save_pretrained(tmp_path / "m")
    out = tmp_path / "r.json"
    # As users run it: `python -m chop eval` ends its process without the interpreter's teardown; all it printed and
    # wrote must be there.
    done = subprocess.run([sys.executable, "-m", "chop", "eval", "--model", str(tmp_path / "m"), "--tasks",
                           "piqa,copa,lambada_openai", "--data_dir", str(EVAL_FIX), "--output", str(out),
                           "--batch_size", "8"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    printed = done.stdout
    assert "|piqa|6|acc|" in printed and "|lambada_openai|6|perplexity|" in printed
    saved = json.loads(out.read_text())
    assert set(saved["results"]) == {"piqa", "copa", "lambada_openai"} and 0 <= saved["results"]["piqa"]["acc"] <= 1
    with pytest.raises(FileExistsError, match="--output: .* exists"):
        main(["eval", "--model", str(tmp_path / "m"), "--tasks", "piqa", "--data_dir", str(EVAL_FIX), "--output", str(out)])


def test_chop_eval_starts_without_lightning():
    # Lightning's import costs seconds that an evaluation of an HF model never uses.
    code = "import sys, chop, chop.cli, chop.eval.eval_cli; assert 'lightning' not in sys.modules, 'imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_chop_eval_tokenises_in_threads_even_where_parallelism_is_off(eval_tokenizer, monkeypatch):
    # TOKENIZERS_PARALLELISM=false (the Makefile's, and many users') makes batch encoding serial; chop eval's encoder
    # turns it on for its batches alone, with the same tokens.
    import os

    from chop.eval.engine import Encoder

    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    rust, seen = eval_tokenizer.backend_tokenizer, []

    class Spy:
        def encode_batch(self, texts, **kwargs):
            seen.append(os.environ["TOKENIZERS_PARALLELISM"])
            return rust.encode_batch(texts, **kwargs)

        def decode_batch(self, ids, **kwargs):
            seen.append(os.environ["TOKENIZERS_PARALLELISM"])
            return rust.decode_batch(ids, **kwargs)

        def to_str(self):
            return rust.to_str()

    monkeypatch.setattr(type(eval_tokenizer), "backend_tokenizer", property(lambda self: Spy()))
    requests = [("The cat sat on the", " mat"), ("Paris is in", " France"), ("", " hello")]
    threaded = Encoder(eval_tokenizer, threads=True).encode_pairs(requests)
    assert seen and set(seen) == {"true"} and os.environ["TOKENIZERS_PARALLELISM"] == "false"
    n = len(seen)
    assert Encoder(eval_tokenizer).encode_pairs(requests) == threaded and set(seen[n:]) == {"false"}
