"""liger's rotary kernel on the batches ``chop eval --mode fast`` runs, as liger calls it (one compilation per batch
size: liger 0.8.5 takes it as a Triton constant) and as chop does (``rope_as_one_row``: the rows end to end, one
batch size): compilations and seconds on a machine's first run, and on the run after.

    python benchmarks/rope_batches.py [--shapes benchmarks/results/eval_tokens_smollm2_cpu.json] [--mode fast]

The batches are those ``benchmarks/eval_tokens.py`` planned for the suite ([rows, width] each, auto batch size at an
H100's or H200's token budget); queries and keys of SmolLM2-135M's shape (9 and 3 heads of 64) by default, bf16, with
per-row positions as fast mode's packed rows have. Each way runs in a fresh process with an empty Triton cache: a
first pass over every batch (compiling as it goes), a second pass, and the median of 20 calls on the largest batch
(what the folding itself costs), with cos and sin per row and with one for all rows (training's, which chop copies to
every row). Prints a table and writes rope_batches.json (to $OUT, else benchmarks/results/).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from common import result_path
from gpu_clock import timed

WAYS = ("liger", "chop")


def worker(args) -> dict:
    """One way's timings, in this process (its Triton cache empty)."""
    from liger_kernel.ops.rope import _triton_rope
    from liger_kernel.transformers.rope import liger_rotary_pos_emb

    from chop.models.kernels import rope_as_one_row

    def rope(q, k, cos, sin):
        return liger_rotary_pos_emb(q, k, cos, sin) if args.worker == "liger" else \
            rope_as_one_row(liger_rotary_pos_emb, q, k, cos, sin)

    def inputs(rows: int, width: int, cos_rows: int = 0) -> tuple[torch.Tensor, ...]:
        """q and k as HF's attention passes them; cos and sin per row, or for ``cos_rows`` = 1 one for all rows."""
        q, k = (torch.randn(rows, width, h, args.head_dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
                for h in (args.heads, args.kv_heads))
        angle = torch.rand(cos_rows or rows, width, args.head_dim, device="cuda") * 100
        return q, k, angle.cos().bfloat16(), angle.sin().bfloat16()

    shapes = json.loads(Path(args.shapes).read_text())["modes"][args.mode]["shapes"]

    def one_pass() -> float:
        seconds = 0.0
        for rows, width in shapes:
            x = inputs(rows, width)
            seconds += timed(lambda: rope(*x))[1]
        return seconds

    rope(*inputs(1, 8))  # CUDA and Triton's own set-up, outside the clock (a compilation for the one-row size)
    first, second = one_pass(), one_pass()
    def per_call(x: tuple[torch.Tensor, ...]) -> float:
        """Median milliseconds of 20 calls."""
        return 1e3 * statistics.median(timed(lambda: rope(*x))[1] for _ in range(20))

    largest = max(shapes, key=lambda s: s[0] * s[1])
    # Per-row positions (fast mode's packed rows), and one set for all rows (training's), which chop copies per row.
    row_cos, shared_cos = per_call(inputs(*largest)), per_call(inputs(*largest, cos_rows=1))
    compiled = sum(len(cache[0]) for cache in _triton_rope.device_caches.values())
    return {"compilations": compiled, "first_pass_s": first, "second_pass_s": second, "largest_batch": largest,
            "largest_batch_ms": row_cos, "largest_batch_shared_cos_ms": shared_cos, "batches": len(shapes),
            "distinct_rows": len({r for r, _ in shapes})}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=str(Path(__file__).parent / "results" / "eval_tokens_smollm2_cpu.json"),
                   help="an eval_tokens.py result: its batches' [rows, width]")
    p.add_argument("--mode", default="fast", choices=["fast", "exact"], help="which mode's batches")
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv_heads", type=int, default=3)
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--worker", choices=WAYS, help=argparse.SUPPRESS)  # internal: one way, in a fresh process
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    from chop.provenance import provenance

    results = {}
    for way in WAYS:
        env = dict(os.environ, TRITON_CACHE_DIR=tempfile.mkdtemp())
        cmd = [sys.executable, __file__, "--worker", way] + [f"--{k}={v}" for k, v in vars(args).items()
                                                              if k != "worker" and v is not None]
        results[way] = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True,
                                                 text=True).stdout.splitlines()[-1])
    gpu = torch.cuda.get_device_name()
    shapes = json.loads(Path(args.shapes).read_text())
    data = {"batches": f"{args.mode} mode's on {shapes['provenance']['data']['tasks']}, from {args.shapes}",
            "shape": f"{args.heads} query and {args.kv_heads} key heads of {args.head_dim}, bf16 (random)"}
    out = result_path("rope_batches.json")
    out.write_text(json.dumps({"provenance": provenance(None, data), "gpu": gpu, "results": results}, indent=2))
    r = results["liger"]
    print(f"liger's rotary kernel on {r['batches']} batches ({r['distinct_rows']} numbers of rows), {gpu}, "
          f"empty Triton cache:")
    print(f"| called | compilations | first pass | second pass | largest batch {r['largest_batch']}, cos per row | "
          f"one cos |\n|---|---:|---:|---:|---:|---:|")
    for way, r in results.items():
        print(f"| {'as liger calls it' if way == 'liger' else 'rows end to end (chop)'} | {r['compilations']} | "
              f"{r['first_pass_s']:.2f} s | {r['second_pass_s'] * 1e3:.1f} ms | {r['largest_batch_ms']:.3f} ms | "
              f"{r['largest_batch_shared_cos_ms']:.3f} ms |")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
