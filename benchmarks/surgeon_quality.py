"""Held-out perplexity after structured pruning: LLM Surgeon against its baselines (K-OBD, magnitude), by the number
of calibration tokens, on one real model.

    python benchmarks/surgeon_quality.py --model DIR [--sparsity 0.2] [--shots 2] [--calibration 32x128 128x2048]

Every run starts from the same dense weights. Calibration: chop's prune default (wikitext-2 train; offline, chop's
english-passages train split); held-out: ``--held_out`` blocks of ``--held_len`` tokens (wikitext-2 test; offline,
english-passages val). The correlated updates solve least-squares problems in the factors, so they need enough
calibration tokens for factors of the MLP's width; the table shows where Surgeon overtakes K-OBD. Prints a table,
writes surgeon_quality.json ($OUT, else benchmarks/results/).
"""

import argparse
import copy
import json
import os
import time
from pathlib import Path

import torch

from chop.models.loading import load_model, load_tokenizer
from chop.pruning.prune_cli import Text, blocks, perplexity
from chop.pruning.surgeon import Surgeon, prune

BASELINES = {"surgeon": {}, "obd": {"obd": True}, "magnitude": {"magnitude": True},
             "surgeon_lora": {"lora_rank": 16}}  # with first-order updates between shots (the settings' defaults)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True, help="a Hugging Face directory or hub id")
    p.add_argument("--sparsity", type=float, default=0.2)
    p.add_argument("--shots", type=int, default=2)
    p.add_argument("--calibration", nargs="+", default=["32x128", "64x128", "128x128", "64x256", "128x512", "128x2048"],
                   help="SAMPLESxLENGTH calibration sets")
    p.add_argument("--methods", nargs="+", default=["surgeon", "obd", "magnitude"], choices=list(BASELINES))
    p.add_argument("--held_out", type=int, default=64, help="held-out blocks")
    p.add_argument("--held_len", type=int, default=512, help="tokens per held-out block")
    p.add_argument("--batch_tokens", type=int, default=8192, help="calibration tokens per forward/backward")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = load_tokenizer(args.model)
    dense = load_model(args.model, dtype="float32").to(device)
    held = blocks(Text(split="test"), tok, args.held_len + 1, args.held_out, "val", "--held_out")
    results = {"model": args.model, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
               "sparsity": args.sparsity, "shots": args.shots, "dense_ppl": perplexity(dense, held), "runs": []}
    print(f"dense held-out perplexity {results['dense_ppl']:.2f} ({args.held_out} x {args.held_len} tokens)", flush=True)
    for calibration in args.calibration:
        samples, length = (int(x) for x in calibration.split("x"))
        calib = blocks(Text(), tok, length + 1, samples, "train", "--calibration")
        per_batch = max(1, args.batch_tokens // length)
        batches = [torch.stack(calib[i:i + per_batch]) for i in range(0, samples, per_batch)]
        for method in args.methods:
            if method == "magnitude" and any(r["method"] == "magnitude" for r in results["runs"]):
                continue  # needs no calibration: once is enough
            model = copy.deepcopy(dense)
            t0 = time.perf_counter()
            report = prune(model, Surgeon(mode="structured", sparsity=args.sparsity, shots=args.shots,
                                          **BASELINES[method]), batches, evaluate=lambda m: perplexity(m, held))
            run = {"method": method, "calibration": calibration, "tokens": samples * length,
                   "ppl_by_shot": [s["ppl"] for s in report.shots], "ppl": report.shots[-1]["ppl"],
                   "sparsity": 1 - report.params_after / report.params_before, "seconds": time.perf_counter() - t0}
            results["runs"].append(run)
            print(f"  {calibration:>9} {samples * length:>8,} tokens  {method:<10} ppl {run['ppl']:>10.2f}  "
                  f"(by shot {', '.join(f'{x:.2f}' for x in run['ppl_by_shot'])}; sparsity {run['sparsity']:.4f}; "
                  f"{run['seconds']:.0f} s)", flush=True)
            del model
    out = Path(os.environ.get("OUT", Path(__file__).parent / "results")) / "surgeon_quality.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
