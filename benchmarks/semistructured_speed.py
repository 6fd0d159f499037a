"""Forward latency of a 2:4-pruned model with PyTorch's semi-structured sparse kernels against the same model dense,
and of a structurally pruned (physically smaller) model against the dense one.

    python benchmarks/semistructured_speed.py [--tokens 8192] [--structured 0.3]

A random-init TinyLlama-shaped Llama (1.1B, bf16) on one GPU. 2:4: every decoder linear keeps the 2 largest of each
4 weights (the pattern LLM Surgeon's semistructured mode leaves), then ``chop.pruning.sparse.to_semi_structured``.
Structured: ``--structured`` of the decoder linears removed as MLP units and attention groups by magnitude (the
shapes LLM Surgeon's structured mode leaves) and sliced out. Median of ``--iters`` forwards each; prints a table and
writes semistructured_speed.json ($OUT, else benchmarks/results/).
"""

import argparse
import json
import statistics
import time

import torch
from common import result_path


def latency(model, ids, iters: int) -> float:
    times = []
    with torch.inference_mode():
        for i in range(iters + 3):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(input_ids=ids, use_cache=False)
            torch.cuda.synchronize()
            if i >= 3:
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--structured", type=float, default=0.3)
    args = p.parse_args()

    from chop.models.loading import load_model
    from chop.pruning.elements import nm_costs
    from chop.pruning.magnitude import Magnitude
    from chop.pruning.sparse import to_semi_structured
    from chop.pruning.structures import linears

    cfg = dict(model_type="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
               num_attention_heads=32, num_key_value_heads=4, vocab_size=32000, max_position_embeddings=args.seq)

    def fresh():
        with torch.device("cuda"):
            return load_model(config=cfg, dtype="bfloat16").eval()

    ids = torch.randint(0, 32000, (args.tokens // args.seq, args.seq), device="cuda")
    model = fresh()
    params = sum(p.numel() for p in model.parameters())
    dense = latency(model, ids, args.iters)
    with torch.no_grad():
        for layer in linears(model).values():
            w = layer.weight
            _, mask = nm_costs(w.float().abs(), 2, 4)
            w.masked_fill_(mask, 0)
    masked = latency(model, ids, args.iters)  # dense kernels on 2:4 zeros: the same work
    swapped = to_semi_structured(model)
    sparse = latency(model, ids, args.iters)
    del model
    torch.cuda.empty_cache()
    model = fresh()
    Magnitude(mode="structured", sparsity=args.structured).prune(model, [])
    small = sum(p.numel() for p in model.parameters())
    structured = latency(model, ids, args.iters)
    rows = [("dense", dense, params), ("2:4 zeros, dense kernels", masked, params),
            (f"2:4 semi-structured kernels ({swapped} linears)", sparse, params),
            (f"structured {args.structured:.0%} of decoder linears, sliced", structured, small)]
    print(f"\nForward of {args.tokens:,} tokens, {params / 1e9:.2f}B Llama, bf16, {torch.cuda.get_device_name()}")
    print(f"  {'model':<48}{'median ms':>10}{'speed-up':>10}{'params':>10}")
    for name, t, n in rows:
        print(f"  {name:<48}{t * 1e3:>10.1f}{dense / t:>10.2f}{n / 1e9:>9.2f}B")
    out = result_path("semistructured_speed.json")
    out.write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "args": vars(args),
                               "rows": [{"model": n, "median_s": t, "speedup": dense / t, "params": k}
                                        for n, t, k in rows]}, indent=2))


if __name__ == "__main__":
    main()
