"""Zero-shot evaluation time, chop against lm-evaluation-harness's HF backend, same model, tasks and documents.

    python benchmarks/eval_speed.py --model DIR --data_dir DIR [--tasks just_chop] [--limit N] [--llama_1b]

Both end to end: model and data loading, tokenisation, scoring, metrics. chop: ``python -m chop eval``'s ``run``
(bf16, batch size auto). lm-eval 0.4.13: ``simple_evaluate(model="hf", dtype=bfloat16, batch_size=64)`` with its
own task definitions, its ``load_dataset`` pointed at the rows of ``--data_dir`` (chop.eval.reference). Reports
both times, the ratio, every metric side by side and the largest per-example log-likelihood difference.
``--float32_reference`` scores once more in float32 and says how far each bf16 run is from it. ``--llama_1b`` adds a random-init Llama of about 1B parameters (hidden 2048, 16 layers, MLP 8192, the model's
tokenizer), the compute-bound case. Prints a table and writes eval_speed.json (to $OUT, else benchmarks/results/).
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch


def compare(model_dir: str, args, label: str) -> dict:
    from chop.eval.reference import run_lm_eval
    from chop.eval.run import run

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    ours = run(model_dir, args.tasks, limit=args.limit, data_dir=args.data_dir, samples=True)
    torch.cuda.synchronize()
    chop_s = time.perf_counter() - t0
    torch.cuda.empty_cache()
    t0 = time.perf_counter()
    theirs = run_lm_eval(model_dir, list(ours["results"]), limit=args.limit, data_dir=args.data_dir,
                         batch_size=args.lm_eval_batch, dtype="bfloat16", device="cuda")
    lm_eval_s = time.perf_counter() - t0
    metrics = {}
    lls = {"chop": {}, "lm_eval": {}}
    for task, r in ours["results"].items():
        for m in ("acc", "acc_norm"):
            if m in r:
                metrics[f"{task}/{m}"] = (r[m], theirs["results"][task][f"{m},none"])
        lls["chop"][task] = [s["lls"] for s in ours["samples"][task]]
        lls["lm_eval"][task] = [[float(x[0]) for x in s["filtered_resps"]]
                                for s in sorted(theirs["samples"][task], key=lambda s: s["doc_id"])]
    worst, flips = differ(lls["chop"], lls["lm_eval"])
    out = {"model": label, "chop_s": chop_s, "lm_eval_s": lm_eval_s, "speedup": lm_eval_s / chop_s,
           "metrics": metrics, "identical": all(a == b for a, b in metrics.values()),
           "max_ll_diff": worst, "argmax_flips": flips,
           "requests": sum(len(s["lls"]) for v in ours["samples"].values() for s in v)}
    print(f"\n{label}: chop {chop_s:.1f} s, lm-eval {lm_eval_s:.1f} s, {out['speedup']:.1f}x; "
          f"{out['requests']:,} requests; metrics identical: {out['identical']}; largest per-example log-likelihood "
          f"difference {worst:.2e}; choices where the two pick differently: {flips}", flush=True)
    if args.float32_reference:  # which bf16 run is nearer the float32 numbers (chop float32 = lm-eval float32 on CPU)
        exact = run(model_dir, args.tasks, limit=args.limit, data_dir=args.data_dir, samples=True, dtype="float32")
        truth = {task: [s["lls"] for s in v] for task, v in exact["samples"].items()}
        out["vs_float32"] = {}
        for name, got in lls.items():
            worst, flips = differ(got, truth)
            out["vs_float32"][name] = {"max_ll_diff": worst, "argmax_flips": flips}
            print(f"  {name} bf16 against float32: largest log-likelihood difference {worst:.3f}, "
                  f"choices picked differently {flips}")
    for k, (a, b) in metrics.items():
        print(f"  {k:<24}{a:>8.4f}{b:>8.4f}")
    return out


def differ(a: dict, b: dict) -> tuple[float, int]:
    """Largest per-choice log-likelihood difference and the number of documents whose argmax differs."""
    worst, flips = 0.0, 0
    for task in a:
        for x, y in zip(a[task], b[task]):
            worst = max(worst, max(abs(p - q) for p, q in zip(x, y)))
            flips += int(max(range(len(x)), key=x.__getitem__) != max(range(len(y)), key=y.__getitem__))
    return worst, flips


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True, help="a Hugging Face directory (with its tokenizer)")
    p.add_argument("--data_dir", required=True, help="<task>/ folders of documents, as `chop eval --data_dir`")
    p.add_argument("--tasks", default="just_chop")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--lm_eval_batch", type=int, default=64)
    p.add_argument("--llama_1b", action="store_true")
    p.add_argument("--float32_reference", action="store_true", help="also score in float32: which bf16 run is nearer")
    p.add_argument("--limit_1b", type=int, default=None, help="documents per task for the 1B model")
    args = p.parse_args()
    results = {"gpu": torch.cuda.get_device_name(), "tasks": args.tasks, "runs": [compare(args.model, args, "SmolLM2-135M")]}
    if args.llama_1b:
        from transformers import AutoTokenizer

        from chop.models.loading import load_model

        tok = AutoTokenizer.from_pretrained(args.model)
        with torch.device("cuda"):
            big = load_model(config=dict(model_type="llama", hidden_size=2048, num_hidden_layers=16,
                                         num_attention_heads=32, num_key_value_heads=8, intermediate_size=8192,
                                         vocab_size=len(tok), max_position_embeddings=2048,
                                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
                             dtype="bfloat16")
        n = sum(p.numel() for p in big.parameters())
        folder = tempfile.mkdtemp()
        big.save_pretrained(folder)
        tok.save_pretrained(folder)
        del big
        torch.cuda.empty_cache()
        args.limit = args.limit_1b
        results["runs"].append(compare(folder, args, f"random-init Llama {n / 1e9:.2f}B"))
    out = Path(os.environ.get("OUT", Path(__file__).parent / "results")) / "eval_speed.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
