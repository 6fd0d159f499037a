"""Zero-shot evaluation time, chop against lm-evaluation-harness's HF backend, same model, tasks and documents.

    python benchmarks/eval_speed.py --model DIR --data_dir DIR [--tasks just_chop] [--limit N] [--llama_1b]

Both end to end, in this one process, chop first (so lm-eval finds CUDA and the libraries already loaded): model and
data loading, tokenisation, scoring, metrics. chop: ``python -m chop eval``'s ``run`` (``--dtype``, default bf16;
batch size auto). lm-eval 0.4.13: ``simple_evaluate(model="hf", dtype, batch_size=64)`` with its own task
definitions, its ``load_dataset`` pointed at the rows of ``--data_dir`` (chop.eval.reference). Reports both times,
the ratio, every metric side by side and the largest per-example log-likelihood difference. ``--share_contexts``
times chop once more with contexts shared between choices (fewer tokens; numbers equal to lm-eval's only to bf16
rounding). ``--float32_reference`` scores once more in float32 and says how far each bf16 run is from it; more than
one ``--lm_eval_batch`` reruns lm-eval at those batch sizes and says whether its own numbers change. ``--llama_1b``
adds a random-init Llama of about 1B parameters (hidden 2048, 16 layers, MLP 8192, the model's tokenizer), the
compute-bound case. Prints a table and writes eval_speed.json (to $OUT, else benchmarks/results/).
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
    ours = run(model_dir, args.tasks, limit=args.limit, data_dir=args.data_dir, samples=True, dtype=args.dtype)
    torch.cuda.synchronize()
    chop_s = time.perf_counter() - t0
    torch.cuda.empty_cache()
    runs, lm_eval_s = [], None
    for batch in args.lm_eval_batch:
        t0 = time.perf_counter()
        runs.append(run_lm_eval(model_dir, list(ours["results"]), limit=args.limit, data_dir=args.data_dir,
                                batch_size=batch, dtype=args.dtype, device="cuda"))
        lm_eval_s = lm_eval_s or time.perf_counter() - t0  # the first batch size is the timed one
    theirs = runs[0]
    metrics = {}
    lls = {"chop": {}, "lm_eval": {}}
    for task, r in ours["results"].items():
        for m in ("acc", "acc_norm"):
            if m in r:
                metrics[f"{task}/{m}"] = (r[m], *(t["results"][task][f"{m},none"] for t in runs))
        lls["chop"][task] = [s["lls"] for s in ours["samples"][task]]
        lls["lm_eval"][task] = _lm_eval_lls(theirs, task)
    worst, flips = differ(lls["chop"], lls["lm_eval"])
    out = {"model": label, "dtype": args.dtype, "chop_s": chop_s, "lm_eval_s": lm_eval_s,
           "speedup": lm_eval_s / chop_s, "lm_eval_batch": args.lm_eval_batch, "metrics": metrics,
           "identical": all(v[0] == v[1] for v in metrics.values()), "max_ll_diff": worst, "argmax_flips": flips,
           "requests": sum(len(s["lls"]) for v in ours["samples"].values() for s in v)}
    print(f"\n{label} ({args.dtype}): chop {chop_s:.1f} s, lm-eval (batch {args.lm_eval_batch[0]}) {lm_eval_s:.1f} s, "
          f"{out['speedup']:.1f}x; {out['requests']:,} requests; metrics identical: {out['identical']}; largest "
          f"per-example log-likelihood difference {worst:.2e}; choices where the two pick differently: {flips}",
          flush=True)
    if args.share_contexts:  # the faster mode that gives up bit-identity: how much faster, how far off
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        shared = run(model_dir, args.tasks, limit=args.limit, data_dir=args.data_dir, samples=True, dtype=args.dtype,
                     share_contexts=True)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        worst, flips = differ({task: [s["lls"] for s in v] for task, v in shared["samples"].items()}, lls["lm_eval"])
        same = sum(shared["results"][k.split("/")[0]][k.split("/")[1]] == v[1] for k, v in metrics.items())
        out["share_contexts"] = {"chop_s": seconds, "speedup": lm_eval_s / seconds, "max_ll_diff": worst,
                                 "argmax_flips": flips, "metrics_equal": same, "metrics": len(metrics)}
        print(f"  chop --share_contexts: {seconds:.1f} s, {lm_eval_s / seconds:.1f}x; largest log-likelihood difference "
              f"{worst:.3f}, choices picked differently {flips}, metrics equal {same} of {len(metrics)}", flush=True)
    out["lm_eval_self"] = {}
    for j in range(1, len(runs)):  # does lm-eval agree with itself at another batch size?
        worst, flips = differ(lls["lm_eval"], {task: _lm_eval_lls(runs[j], task) for task in lls["lm_eval"]})
        same = sum(v[1] == v[1 + j] for v in metrics.values())
        batch = args.lm_eval_batch[j]
        out["lm_eval_self"][batch] = {"max_ll_diff": worst, "argmax_flips": flips, "metrics_equal": same,
                                      "metrics": len(metrics)}
        print(f"  lm-eval batch {batch} against batch {args.lm_eval_batch[0]}: largest log-likelihood difference "
              f"{worst:.3f}, choices picked differently {flips}, metrics equal {same} of {len(metrics)}")
    if args.float32_reference:  # which bf16 run is nearer the float32 numbers (chop float32 = lm-eval float32 on CPU)
        exact = run(model_dir, args.tasks, limit=args.limit, data_dir=args.data_dir, samples=True, dtype="float32")
        truth = {task: [s["lls"] for s in v] for task, v in exact["samples"].items()}
        out["vs_float32"] = {}
        for name, got in lls.items():
            worst, flips = differ(got, truth)
            out["vs_float32"][name] = {"max_ll_diff": worst, "argmax_flips": flips}
            print(f"  {name} {args.dtype} against float32: largest log-likelihood difference {worst:.3f}, "
                  f"choices picked differently {flips}")
    print(f"  {'metric':<24}{'chop':>8}" + "".join(f"{'lm-eval b' + str(b):>14}" for b in args.lm_eval_batch))
    for k, v in metrics.items():
        print(f"  {k:<24}{v[0]:>8.4f}" + "".join(f"{x:>14.4f}" for x in v[1:]))
    return out


def _lm_eval_lls(result: dict, task: str) -> list[list[float]]:
    return [[float(x[0]) for x in s["filtered_resps"]] for s in sorted(result["samples"][task], key=lambda s: s["doc_id"])]


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
    p.add_argument("--lm_eval_batch", type=int, nargs="+", default=[64],
                   help="lm-eval's batch size (the first is timed; more: whether lm-eval's numbers change with it)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="both engines' dtype")
    p.add_argument("--llama_1b", action="store_true")
    p.add_argument("--float32_reference", action="store_true", help="also score in float32: which bf16 run is nearer")
    p.add_argument("--share_contexts", action="store_true", help="also time chop with shared contexts")
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
