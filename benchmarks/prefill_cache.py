"""What writing the KV cache costs a prefill: one forward over batch x 2,048 tokens of a random-init Llama (bf16),
with and without transformers' cache and with the last position's logits or all of them, and the kernels in which
``generate``'s way (cache, last logits) and a scoring forward's (no cache, all logits) differ.

    python benchmarks/prefill_cache.py [--model 7b] [--batch 16] [--kernels liger]

Prints a table (medians of ``--reps`` after a warm-up, two rounds, peak memory) and the GPU milliseconds per kernel
of one profiled forward each way where they differ; writes prefill_cache_<model>.json ($OUT, else
benchmarks/results/).
"""

import argparse
import json

import torch

from chop.models.kernels import apply_kernels
from chop.models.loading import load_model
from chop.provenance import provenance
from common import result_path
from inference_speed import DEVICE, SHAPES, kernel_ms, timed

WAYS = {
    "cache, last logits (generate)": dict(use_cache=True, logits_to_keep=1),
    "no cache, last logits": dict(use_cache=False, logits_to_keep=1),
    "cache, all logits": dict(use_cache=True),
    "no cache, all logits (scoring)": dict(use_cache=False),
}


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="7b", choices=list(SHAPES))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--kernels", default="liger", choices=["torch", "liger"])
    a = p.parse_args()
    model = load_model(config=SHAPES[a.model], dtype="bfloat16", attn_implementation="sdpa",
                       init_device=DEVICE).eval()
    apply_kernels(model, a.kernels)
    ids = torch.randint(0, model.config.vocab_size, (a.batch, 2048), device=DEVICE)
    result = {"provenance": provenance(None, {"tokens": "random ids"}), "settings": vars(a), "ways": {}}
    print(f"{a.model}, batch {a.batch} x 2,048 tokens, kernels {a.kernels}")
    print(f"{'':<32}{'round 1 ms':>11}{'round 2 ms':>11}{'peak GiB':>10}")
    for name, kw in WAYS.items():
        result["ways"][name] = {"ms": [], "peak_gib": 0.0}
    for _ in range(2):  # two rounds, alternating ways: the order is not what differs
        for name, kw in WAYS.items():
            if DEVICE == "cuda":
                torch.cuda.reset_peak_memory_stats()
            result["ways"][name]["ms"].append(1e3 * timed(lambda: model(input_ids=ids, **kw), a.reps))
            if DEVICE == "cuda":
                result["ways"][name]["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    for name, way in result["ways"].items():
        print(f"{name:<32}{way['ms'][0]:>11.1f}{way['ms'][1]:>11.1f}{way['peak_gib']:>10.1f}")
    first, second = "cache, last logits (generate)", "no cache, all logits (scoring)"
    profiles = {n: kernel_ms(lambda: model(input_ids=ids, **WAYS[n])) for n in (first, second)}
    names = set(profiles[first]) | set(profiles[second])
    differ = sorted(((profiles[first].get(k, 0.0), profiles[second].get(k, 0.0), k) for k in names
                     if abs(profiles[first].get(k, 0.0) - profiles[second].get(k, 0.0)) > 0.5),
                    key=lambda t: -abs(t[0] - t[1]))
    result["gpu_ms"] = {n: sum(v.values()) for n, v in profiles.items()}
    result["kernels_that_differ_ms"] = [{"kernel": k, first: x, second: y} for x, y, k in differ]
    print(f"\nGPU ms per kernel, where the two differ by over 0.5 ms (totals: {first} {result['gpu_ms'][first]:.1f}, "
          f"{second} {result['gpu_ms'][second]:.1f})")
    print(f"{'generate':>9}{'scoring':>9}  kernel")
    for x, y, k in differ:
        print(f"{x:>9.1f}{y:>9.1f}  {k[:100]}")
    result_path(f"prefill_cache_{a.model}.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
