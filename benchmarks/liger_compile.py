"""What liger's kernels cost a fresh process before its first forward returns: Triton's hash of itself and the
kernels' compilation, as the first forward does them (one after another) against ``chop.models.kernels.compile_ahead``
(the hash, then the kernels in threads), in fresh processes, alternating, with an empty Triton cache (a machine's
first run: every kernel compiled) and with the cache the runs before left (warm: looked up).

    python benchmarks/liger_compile.py [--repeats 3] [--shape smollm2]

A random-init model of the shape, bf16, on the GPU, liger's kernels applied; timed from there: the way's own step
(none, or compile_ahead), a first forward of 8 x 128 tokens, and one of 3 x 85 (255 tokens, the rotary kernel's other
specialisation). Prints a table of medians and writes liger_compile.json (to $OUT, else benchmarks/results/).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import torch
from common import result_path

SHAPES = {
    "smollm2": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "1.1b": dict(model_type="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4, vocab_size=32000),
}
PROBE = """
import json, sys, time, torch
from chop.models.kernels import apply_kernels, compile_ahead, hash_triton
from chop.models.loading import load_model
model = load_model(config={shape}, dtype="bfloat16", init_device="cuda").eval()
apply_kernels(model, "liger")
torch.cuda.synchronize()
times, t = {{}}, time.perf_counter()
def lap(name):
    global t
    torch.cuda.synchronize()
    times[name] = time.perf_counter() - t
    t = time.perf_counter()
if "{way}" == "compile_ahead":
    hash_triton(); lap("hash")
    compile_ahead(model); lap("compile_ahead")
with torch.inference_mode():
    model(input_ids=torch.zeros(8, 128, dtype=torch.long, device="cuda"), use_cache=False); lap("first forward")
    model(input_ids=torch.zeros(3, 85, dtype=torch.long, device="cuda"), use_cache=False); lap("255-token forward")
print(json.dumps(times))
"""
WAYS = ["in the forward", "compile_ahead"]


def run(way: str, shape: str, cache: str) -> dict:
    env = dict(os.environ, TRITON_CACHE_DIR=cache)
    out = subprocess.run([sys.executable, "-c", PROBE.format(way=way, shape=SHAPES[shape])], env=env, check=True,
                         capture_output=True, text=True).stdout.strip().splitlines()[-1]
    times = json.loads(out)
    return {**times, "total": sum(times.values())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--shape", default="smollm2", choices=list(SHAPES))
    args = p.parse_args()
    from chop.provenance import provenance

    warm = tempfile.mkdtemp()
    run(WAYS[0], args.shape, warm)  # untimed: bytecode compiled, files cached, the warm cache filled
    runs = {f"{way}, {cache}": [] for cache in ("cold", "warm") for way in WAYS}
    for _ in range(args.repeats):
        for cache in ("cold", "warm"):
            for way in WAYS:
                runs[f"{way}, {cache}"].append(run(way, args.shape, tempfile.mkdtemp() if cache == "cold" else warm))
    median = {k: {part: statistics.median(r[part] for r in rs) for part in rs[0]} for k, rs in runs.items()}
    gpu = torch.cuda.get_device_name()
    out = result_path("liger_compile.json")
    prov = provenance(None, {"tokens": "zeros: only the shapes matter"}, note=f"random-init {args.shape} shape, bf16")
    out.write_text(json.dumps({"provenance": prov, "gpu": gpu, "shape": args.shape, "median_s": median, "runs": runs},
                              indent=2))
    print(f"liger's kernels before a first forward returns, {args.shape} shape, {gpu}, medians of {args.repeats} "
          "fresh processes (seconds):")
    print("| way, Triton cache | hash | compile_ahead | first forward | 255-token forward | total |\n|---|---:|---:|---:|---:|---:|")
    for k, m in median.items():
        print(f"| {k} | " + " | ".join(f"{m[part]:.2f}" if part in m else "-" for part in
                                       ("hash", "compile_ahead", "first forward", "255-token forward", "total")) + " |")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
