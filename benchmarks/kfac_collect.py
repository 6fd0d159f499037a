"""K-FAC's curvature gathering (``chop.pruning.kfac.collect``) against a plain forward and backward over the same
calibration batches: what its hooks cost, in this checkout and, with ``--baseline REV``, in chop at commit REV (a git
worktree), alternating in fresh processes.

    python benchmarks/kfac_collect.py [--baseline REV] [--repeats 3] [--batches 8 --batch 1 --seq 256] [--device cpu]

The model is random-init, of SmolLM2-135M's shape by default (hidden 576, MLP 1,536, 30 layers, 9 heads and 3 KV
heads; ``--layers`` fewer for a quicker run), in float32; the batches are random token ids. Each process times one
plain forward+backward pass (``fb``) and one ``collect`` over every decoder linear, after an untimed one of each;
hooks = collect - fb. Prints a table of medians and writes kfac_collect.json (to $OUT, else benchmarks/results/).
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

ROOT = Path(__file__).resolve().parents[1]


def worker(args) -> dict:
    """fb and collect seconds, in this process, with whichever chop is first on the path."""
    from chop.models.loading import load_model
    from chop.pruning import kfac
    from chop.pruning.structures import linears

    torch.manual_seed(0)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    gpu = args.device.startswith("cuda")
    model = load_model(config=dict(model_type="llama", hidden_size=args.hidden, intermediate_size=args.mlp,
                                   num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                   num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                                   max_position_embeddings=args.seq),
                       dtype=args.dtype, init_device=args.device if gpu else None).to(args.device)
    batches = [torch.randint(0, args.vocab, (args.batch, args.seq + 1), device=args.device)
               for _ in range(args.batches)]
    layers = linears(model)

    def plain() -> None:
        for ids in batches:
            model.zero_grad(set_to_none=True)
            logits = model(input_ids=ids[:, :-1], use_cache=False).logits
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").backward()
        model.zero_grad(set_to_none=True)

    plain(), kfac.collect(model, layers, batches[:1])  # untimed: first-call costs
    fb = timed(plain)[1]
    collect = timed(lambda: kfac.collect(model, layers, batches))[1]
    return {"fb_s": fb, "collect_s": collect, "hooks_s": collect - fb, "chop": str(Path(kfac.__file__).parents[2])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", help="a commit to compare with (checked out in a temporary git worktree), or the "
                   "folder of another checkout")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the model's weights")
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--mlp", type=int, default=1536)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv_heads", type=int, default=3)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # internal: one timing, this process
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    trees, made = {"this checkout": ROOT}, None
    if args.baseline and Path(args.baseline).is_dir():
        trees[f"baseline {args.baseline}"] = Path(args.baseline).resolve()
    elif args.baseline:
        made = Path(tempfile.mkdtemp()) / "baseline"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(made), args.baseline], check=True,
                       capture_output=True)
        trees[f"baseline {args.baseline}"] = made
    flags = [f"--{k}={v}" for k, v in vars(args).items() if k not in ("baseline", "repeats", "worker")]
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    try:
        for _ in range(args.repeats):
            for name, tree in trees.items():  # alternating: any drift of the machine falls on both alike
                env = dict(os.environ, PYTHONPATH=f"{tree}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
                out = subprocess.run([sys.executable, __file__, "--worker", *flags], env=env, check=True,
                                     capture_output=True, text=True, cwd=tree).stdout.splitlines()[-1]
                runs[name].append(json.loads(out))
                if Path(runs[name][-1].pop("chop")) != tree.resolve():
                    raise RuntimeError(f"{name}: the worker imported another chop than {tree}'s")
            save(args, runs)  # after every round: a run cut off keeps the rounds it finished
    finally:
        if made:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(made)], check=False,
                           capture_output=True)
    median = save(args, runs)
    print(f"K-FAC curvature over {args.batches} batches of {args.batch} x {args.seq} random token ids, "
          f"{json.loads(result_path('kfac_collect.json').read_text())['device']}, medians of {args.repeats}:")
    print("| chop | forward+backward | collect | hooks |\n|---|---:|---:|---:|")
    for name, m in median.items():
        print(f"| {name} | {m['fb_s']:.2f} s | {m['collect_s']:.2f} s | {m['hooks_s']:.2f} s |")
    print(f"written to {result_path('kfac_collect.json')}")


def save(args, runs: dict[str, list[dict]]) -> dict:
    """Write the runs so far and their medians; the medians."""
    from chop.provenance import commit, provenance

    median = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items() if rs}
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu ({os.cpu_count()} cores)"
    shape = {k: getattr(args, k) for k in ("hidden", "mlp", "layers", "heads", "kv_heads", "vocab", "dtype")}
    data = {"calibration": f"{args.batches} batches of {args.batch} x {args.seq} random token ids"}
    note = f"random-init Llama {shape}; this checkout is {commit()}"
    result_path("kfac_collect.json").write_text(json.dumps({"provenance": provenance(None, data, note=note),
                                                            "device": device, "shape": shape, "median": median,
                                                            "runs": runs}, indent=2))
    return median


if __name__ == "__main__":
    main()
