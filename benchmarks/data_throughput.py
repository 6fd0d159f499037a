"""Tokens/s of chop's data path (stream + tokenize + pack + batch) on this machine's CPU, beside the tokens/s that
training consumes, to check the GPU is never starved.

    python benchmarks/data_throughput.py [--workers 2] [--seq_len 2048] [--batches 60] [--consumer 56000]

Reads chop's offline English corpus with the SmolLM2 tokenizer (a 49k BPE), through StreamingDataModule's own
DataLoader. --consumer is the training rate to compare with: 56k tokens/s, the 1.1B Llama student on one H100.
Prints a table and writes benchmarks/results/data_throughput.json.
"""

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from chop import assets  # noqa: E402
from chop.training.pretraining_data import StreamingDataModule  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seq_len", type=int, default=2048)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--batches", type=int, default=250)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--consumer", type=float, default=56_000.0, help="tokens/s that training consumes")
    a = p.parse_args()
    corpus = assets.english_passages()
    rates = []
    for _ in range(a.repeats):
        dm = StreamingDataModule(tokenizer="HuggingFaceTB/SmolLM2-135M-Instruct", train_files=[str(corpus / "train.jsonl")],
                                 seq_len=a.seq_len, batch_size=a.batch_size, num_workers=a.workers, shuffle_buffer=1000)
        dm.setup()
        # Timed from the start (worker start-up included): a window of documents is tokenized in one call, so
        # timing only later batches would leave out the tokenization. The default covers two passes of the corpus.
        t0 = time.perf_counter()
        it = iter(dm.train_dataloader())
        for _ in range(a.batches):
            next(it)
        rates.append(a.batches * a.batch_size * a.seq_len / (time.perf_counter() - t0))
        del it
    med = statistics.median(rates)
    result = {"workers": a.workers, "seq_len": a.seq_len, "batch_size": a.batch_size, "cpu_count": os.cpu_count(),
              "tokens_per_s": rates, "median_tokens_per_s": med, "consumer_tokens_per_s": a.consumer,
              "headroom": med / a.consumer}
    print(f"{'data path (tokens/s, median of %d)' % a.repeats:<40}{med:>14,.0f}")
    print(f"{'training consumes (tokens/s)':<40}{a.consumer:>14,.0f}")
    print(f"{'headroom (x)':<40}{med / a.consumer:>14.1f}")
    out = Path(__file__).parent / "results" / "data_throughput.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
