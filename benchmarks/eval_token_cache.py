"""What tokenisation costs `chop eval` end to end: the exact mode in fresh processes, alternately with chop's token
cache removed (a machine's first run: everything tokenised) and with the one the run before left (nothing to
tokenise), ``--repeats`` times each.

    python benchmarks/eval_token_cache.py --model DIR|HUB_ID [--tasks suite] [--repeats 3] [--data_dir DIR]

The model loads in a thread beside the reading and tokenising of the documents, so the tokenise phase's own seconds
overstate what it adds to a run; what it adds is the difference of the two medians, cold less warm, each run timed
from outside (start-up to exit). Reports both, as shares of the cold run's end to end, and each run's phases (chop's
clock). Prints a table and writes eval_token_cache.json (to $OUT, else benchmarks/results/).
"""

import argparse
import json
import statistics
import sys

import torch
from common import result_path
from eval_speed import phases, run_chop


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True, help="a Hugging Face directory or hub id (with its tokenizer)")
    p.add_argument("--data_dir", help="<task>/ folders of documents, as `chop eval --data_dir`")
    p.add_argument("--tasks", default="suite")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--device", default="cuda", help="cpu: a quick check of the script itself")
    p.add_argument("--repeats", type=int, default=3, help="runs with the cache cold, and as many warm")
    args = p.parse_args()
    args.token_cache = "as_found"  # run_chop's default; each run below says cold or warm itself
    from chop.models.loading import resolve
    from chop.provenance import provenance

    prov = provenance(args.model, {"tasks": args.tasks, "limit": args.limit, "documents": args.data_dir or
                                   "each task's evaluation split: the hub's, else chop's offline copies"})
    args.model = resolve(args.model)
    run_chop(args.model, args, args.dtype, limit=2, cache="cold")  # untimed: bytecode compiled, files in page cache
    runs = []
    for i in range(2 * args.repeats):  # cold, warm, cold, warm, ...: any drift of the machine falls on both alike
        cache = "cold" if i % 2 == 0 else "as_found"
        result, seconds = run_chop(args.model, args, args.dtype, cache=cache)
        runs.append({"token_cache": "cold" if cache == "cold" else "warm", "seconds": seconds,
                     "phases": phases(result, seconds)})
        print(f"{runs[-1]['token_cache']}: {seconds:.1f} s "
              f"({', '.join(f'{k} {v:.1f}' for k, v in runs[-1]['phases'].items())})", file=sys.stderr, flush=True)
    median = {c: statistics.median(r["seconds"] for r in runs if r["token_cache"] == c) for c in ("cold", "warm")}
    tokenise = statistics.median(r["phases"]["tokenise"] for r in runs if r["token_cache"] == "cold")
    summary = {"cold_s": median["cold"], "warm_s": median["warm"], "cold_less_warm_s": median["cold"] - median["warm"],
               "cold_less_warm_share": (median["cold"] - median["warm"]) / median["cold"],
               "tokenise_phase_cold_s": tokenise, "tokenise_phase_share": tokenise / median["cold"]}
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    out = result_path("eval_token_cache.json")
    out.write_text(json.dumps({"provenance": prov, "gpu": gpu, "dtype": args.dtype, "mode": "exact",
                               "repeats": args.repeats, "summary": summary, "runs": runs}, indent=2))
    print(f"\n`chop eval --tasks {args.tasks}` (exact, {args.dtype}, {gpu}), medians of {args.repeats}:")
    print("| token cache | end to end | tokenise phase |\n|---|---:|---:|")
    print(f"| cold | {median['cold']:.2f} s | {tokenise:.2f} s ({summary['tokenise_phase_share']:.1%}) |")
    print(f"| warm | {median['warm']:.2f} s | |")
    print(f"cold less warm: {summary['cold_less_warm_s']:.2f} s, {summary['cold_less_warm_share']:.1%} of the cold run; "
          f"written to {out}")


if __name__ == "__main__":
    main()
