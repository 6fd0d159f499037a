"""LLM Surgeon's cost on one GPU: curvature (K-FAC factors over the calibration set) and one structured shot
(costs, selection, correlated updates) on a random-init Llama of about 1B parameters, with peak memory, and the
time extrapolated to Llama-2-7B at the paper's 40 shots.

    python benchmarks/surgeon_speed.py [--samples 128] [--seq 2048] [--sparsity 0.3] [--blocks_per_pass K]
    python benchmarks/surgeon_speed.py --llama2_7b --blocks_per_pass 8 --shots 1    # measured at 7B, no extrapolation

Measured parts: forward+backward over the calibration set alone (``fb``), the same with the factor hooks
(``collect``; hooks = collect - fb), inverting the factors, one shot's selection and updates. Extrapolation: each part
scaled by its complexity (fb: parameters x tokens; hooks: tokens x sum of factor sizes; inverses and updates: sum of
cubed factor dimensions), times the number of shots. Prints a table, writes surgeon_speed.json ($OUT, else
benchmarks/results/). ``--llama2_7b`` measures the Llama-2-7B shape itself (hidden 4096, MLP 11008, 32 layers, 32
heads): its float64 factors (261 GiB) cannot all be resident, so only the blockwise run is timed (``--shots`` shots
with the curvature of ``--blocks_per_pass`` blocks at a time), with one plain forward+backward for scale; the 40-shot
figure is then the measured time per shot times 40. Its JSON (surgeon_speed_7b.json) is written after every curvature
pass as well, so a run cut off within a shot still says how long a pass takes and how much memory it used.
"""

import argparse
import logging
import json
import time

import torch
from gpu_clock import timed
from common import result_path


def linear_dims(hidden: int, mlp: int, layers: int, kv: int, heads: int) -> list[tuple[int, int]]:
    """(in, out) of every decoder linear of a Llama."""
    head_dim = hidden // heads
    per = [(hidden, hidden), (hidden, kv * head_dim), (hidden, kv * head_dim), (hidden, hidden),
           (hidden, mlp), (hidden, mlp), (mlp, hidden)]
    return per * layers


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--sparsity", type=float, default=0.3)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--mlp", type=int, default=5632)  # TinyLlama-1.1B's shape
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--kv_heads", type=int, default=4)
    p.add_argument("--blocks_per_pass", type=int, default=0,
                   help="also run one whole shot with the curvature gathered this many blocks at a time")
    p.add_argument("--llama2_7b", action="store_true", help="the Llama-2-7B shape, blockwise shots only")
    p.add_argument("--shots", type=int, default=1, help="shots of the blockwise run")
    args = p.parse_args()
    if args.llama2_7b:
        if not args.blocks_per_pass:
            raise SystemExit("--llama2_7b: give --blocks_per_pass (all 32 blocks' factors take 261 GiB)")
        args.hidden, args.mlp, args.layers, args.kv_heads = 4096, 11008, 32, 32

    from chop.models.loading import load_model
    from chop.pruning import kfac
    from chop.pruning.shots import State
    from chop.pruning.structures import linears, prunable_params, structures
    from chop.pruning.surgeon import Surgeon, structured_shot

    cfg = dict(model_type="llama", hidden_size=args.hidden, intermediate_size=args.mlp, num_hidden_layers=args.layers,
               num_attention_heads=32, num_key_value_heads=args.kv_heads, vocab_size=32000, max_position_embeddings=args.seq)

    def build():  # drawn on the GPU: on the CPU, 7B random weights take minutes of a device call
        torch.manual_seed(0)  # and the calibration batches after it
        return load_model(config=cfg, dtype="bfloat16", init_device="cuda")

    model = build()
    n_params = sum(p.numel() for p in model.parameters())
    batches = [torch.randint(0, 32000, (args.batch, args.seq + 1), device="cuda")
               for _ in range(args.samples // args.batch)]
    layers = linears(model)

    def plain():
        for ids in batches:
            model.zero_grad(set_to_none=True)
            logits = model(input_ids=ids[:, :-1], use_cache=False).logits.float()
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").backward()
        model.zero_grad(set_to_none=True)

    if not args.llama2_7b:  # at 7B a warm-up costs half a minute of a device call that the shot needs
        timed(plain)
    _, fb = timed(plain)
    if args.llama2_7b:
        return measured_7b(args, model, batches, n_params, fb)
    torch.cuda.reset_peak_memory_stats()
    factors, collect = timed(lambda: kfac.collect(model, layers, batches))
    _, invert = timed(lambda: [f.invert(0.01, 0.01) for f in factors.values()])
    factor_gib = sum(t.numel() * 8 for f in factors.values() for t in (f.A, f.G, f.A_inv, f.G_inv)) / 2**30
    groups = structures(model)
    total = sum(l.weight.numel() for l in layers.values())
    state = State(model, layers, prunable_params(layers), groups)
    _, shot = timed(lambda: structured_shot(state, [factors], args.sparsity * total, Surgeon(sparsity=args.sparsity)))
    peak = torch.cuda.max_memory_allocated() / 2**30
    hooks = collect - fb

    if args.blocks_per_pass:  # the same shot as one call, the curvature of a few blocks resident at a time
        del factors, model, layers
        model = build()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        _, blockwise = timed(lambda: Surgeon(sparsity=args.sparsity, shots=1, blocks_per_pass=args.blocks_per_pass)
                             .prune(model, batches))
        blockwise_peak = torch.cuda.max_memory_allocated() / 2**30

    # Extrapolate to Llama-2-7B (hidden 4096, MLP 11008, 32 layers, 32 heads), 128 x 4096 tokens, 40 shots.
    small = linear_dims(args.hidden, args.mlp, args.layers, args.kv_heads, 32)
    big = linear_dims(4096, 11008, 32, 32, 32)
    tokens_small, tokens_big = args.samples * args.seq, 128 * 4096
    n7 = 6.74e9
    sq = lambda dims: sum((i + 1) ** 2 + o ** 2 for i, o in dims)  # noqa: E731
    cube = lambda dims: sum((i + 1) ** 3 + o ** 3 for i, o in dims)  # noqa: E731
    per_shot_7b = (fb * n7 / n_params * tokens_big / tokens_small + hooks * tokens_big / tokens_small * sq(big) / sq(small)
                   + (invert + shot) * cube(big) / cube(small))
    rows = [("model parameters", f"{n_params / 1e9:.3f}B"), ("calibration tokens", f"{tokens_small:,}"),
            ("forward+backward, no hooks (s)", f"{fb:.2f}"), ("curvature: K-FAC factors (s)", f"{collect:.2f}"),
            ("inverting the factors (s)", f"{invert:.2f}"), ("one structured shot: costs, selection, updates (s)", f"{shot:.2f}"),
            ("curvature + one shot (s)", f"{collect + invert + shot:.2f}"), ("factors, float64 (GiB)", f"{factor_gib:.1f}"),
            ("peak GPU memory (GiB)", f"{peak:.1f}"),
            ("Llama-2-7B, one shot, extrapolated (s)", f"{per_shot_7b:.0f}"),
            ("Llama-2-7B, 40 shots, extrapolated (h)", f"{40 * per_shot_7b / 3600:.2f}"),
            ("Llama-2-7B factors, float64 (GiB)", f"{sq(big) * 2 * 8 / 2**30:.0f}")]
    if args.blocks_per_pass:
        rows += [(f"one shot, {args.blocks_per_pass} blocks per curvature pass (s)", f"{blockwise:.2f}"),
                 (f"peak GPU memory, {args.blocks_per_pass} blocks per pass (GiB)", f"{blockwise_peak:.1f}")]
    print(f"\nLLM Surgeon on {torch.cuda.get_device_name()}")
    for k, v in rows:
        print(f"  {k:<55}{v:>12}")
    out = result_path("surgeon_speed.json")
    out.write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "args": vars(args), "params": n_params,
                               "fb_s": fb, "collect_s": collect, "invert_s": invert, "shot_s": shot,
                               "factors_gib": factor_gib, "peak_gib": peak, "llama2_7b_shot_s": per_shot_7b,
                               "llama2_7b_40_shots_h": 40 * per_shot_7b / 3600,
                               "llama2_7b_factors_gib": sq(big) * 2 * 8 / 2**30,
                               **({"blockwise_shot_s": blockwise, "blockwise_peak_gib": blockwise_peak}
                                  if args.blocks_per_pass else {})}, indent=2))


def measured_7b(args, model, batches, n_params: int, fb: float) -> None:
    """Surgeon on the Llama-2-7B shape itself: ``--shots`` shots, ``--blocks_per_pass`` blocks' curvature at a time."""
    from chop.provenance import provenance
    from chop.pruning.surgeon import Surgeon

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    out = result_path("surgeon_speed_7b.json")
    record = {"provenance": provenance(None, {"tokens": "random ids", "samples": args.samples, "seq": args.seq}),
              "args": vars(args), "params": n_params, "fb_s": fb, "fb_note": "one run, no warm-up before it",
              "passes": [], "shots": [], "complete": False}
    began = time.perf_counter()

    class Progress(logging.Handler):
        """Each curvature pass and each finished shot as Surgeon logs them, written at once: a run cut off mid-shot
        still says how long a pass takes (a shot is 32 / blocks_per_pass passes) and how much memory it used; a
        shot's end less its last pass's is its selection and updates."""

        def emit(self, rec: logging.LogRecord) -> None:
            kind, label = ("passes", "pass") if rec.getMessage().startswith("curvature of blocks") else ("shots", "shot")
            record[kind].append({"message": rec.getMessage(), "since_start_s": time.perf_counter() - began,
                                 "peak_gib": torch.cuda.max_memory_allocated() / 2**30})
            print(f"  {label} {len(record[kind])}: {rec.getMessage()}, {record[kind][-1]['since_start_s']:.0f} s "
                  f"since the start, peak {record[kind][-1]['peak_gib']:.1f} GiB", flush=True)
            out.write_text(json.dumps(record, indent=2))

    for name in ("chop.pruning.surgeon", "chop.pruning.shots"):
        logging.getLogger(name).setLevel(logging.INFO)
        logging.getLogger(name).addHandler(Progress())
    surgeon = Surgeon(sparsity=args.sparsity, shots=args.shots, blocks_per_pass=args.blocks_per_pass)
    report, total = timed(lambda: surgeon.prune(model, batches))
    peak = torch.cuda.max_memory_allocated() / 2**30
    per_shot = total / args.shots
    kept = sum(p.numel() for p in model.parameters())
    rows = [("model parameters", f"{n_params / 1e9:.3f}B"), ("calibration tokens", f"{args.samples * args.seq:,}"),
            ("forward+backward over them, no hooks (s)", f"{fb:.1f}"),
            (f"Surgeon, {args.shots} shot(s) to {args.sparsity:.0%}, {args.blocks_per_pass} blocks per pass (s)", f"{total:.1f}"),
            ("per shot (s)", f"{per_shot:.1f}"), ("peak GPU memory (GiB)", f"{peak:.1f}"),
            ("parameters after", f"{kept / 1e9:.3f}B"), ("40 shots, this per-shot time (h)", f"{40 * per_shot / 3600:.2f}")]
    print(f"\nLLM Surgeon, Llama-2-7B shape, on {torch.cuda.get_device_name()}")
    for k, v in rows:
        print(f"  {k:<70}{v:>12}")
    record.update(complete=True, params_after=kept, surgeon_s=total, per_shot_s=per_shot, peak_gib=peak,
                  projected_40_shots_h=40 * per_shot / 3600)
    out.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
