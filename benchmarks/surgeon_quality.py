"""Held-out perplexity right after pruning (no recovery), every pruning method side by side on one real model, from
the same dense weights and the same calibration text.

    python benchmarks/surgeon_quality.py --model DIR [--part structured|element|all] [--sparsity 0.2] [--calibration 128x2048]

Structured (``--sparsity`` of the decoder linears, as MLP units and attention groups): LLM Surgeon (its structure cost
summed over every part as the paper does, or over what the update touches; per-layer or uniform widths), K-OBD, magnitude,
Minitron's activation ranking (MLP units; MLP units and attention groups). Element (``--element`` unstructured, and
2:4): Wanda, K-OBD, magnitude. Calibration: chop prune's default (wikitext-2 train; offline, english-passages train);
held-out: ``--held_out`` blocks of ``--held_len`` tokens of wikitext-2 test, rows joined by blank lines (offline,
english-passages val). Prints a table, writes surgeon_quality[_PART].json ($OUT, else benchmarks/results/) with its
provenance.
"""

import argparse
import copy
import json
import time

import torch

from chop.models.loading import load_model, load_tokenizer
from chop.provenance import provenance
from chop.pruning.prune_cli import Text, blocks, perplexity
from chop.pruning.registry import pruner_from
from common import result_path


def arms(a: argparse.Namespace) -> dict[str, tuple[str, dict]]:
    """name -> (part, pruning settings)."""
    calib = {"shots": a.shots}
    structured = {"mode": "structured", "sparsity": a.sparsity}
    out = {
        "surgeon": ("structured", {"method": "surgeon", **structured, **calib, "structure_cost": "all_parts"}),
        "surgeon, updated parts' costs": ("structured", {"method": "surgeon", **structured, **calib,
                                                         "structure_cost": "updated"}),
        "surgeon, uniform widths": ("structured", {"method": "surgeon", **structured, **calib, "uniform": True}),
        "K-OBD": ("structured", {"method": "obd", **structured, **calib}),
        "magnitude": ("structured", {"method": "magnitude", **structured}),
        "activation (MLP)": ("structured", {"method": "activation", "sparsity": a.sparsity}),
        "activation (MLP, attention)": ("structured", {"method": "activation", "sparsity": a.sparsity,
                                                       "units": ["mlp", "attention"]}),
    }
    for mode, extra in (("unstructured", {"sparsity": a.element}), ("semistructured", {"n": 2, "m": 4})):
        label = "2:4" if mode == "semistructured" else f"{a.element:.0%} unstructured"
        out[f"wanda, {label}"] = ("element", {"method": "wanda", "mode": mode, **extra})
        out[f"K-OBD, {label}"] = ("element", {"method": "obd", "mode": mode, "shots": 1, **extra})
        out[f"magnitude, {label}"] = ("element", {"method": "magnitude", "mode": mode, **extra})
    return out


def add_data_arguments(p: argparse.ArgumentParser, calibration: str, held_out: int) -> None:
    """The shots, calibration and held-out arguments (shared with ``kfac_precision.py``)."""
    p.add_argument("--shots", type=int, default=2)
    p.add_argument("--calibration", default=calibration, help="SAMPLESxLENGTH")
    p.add_argument("--held_out", type=int, default=held_out, help="held-out blocks")
    p.add_argument("--held_len", type=int, default=512, help="tokens per held-out block")
    p.add_argument("--batch_tokens", type=int, default=8192, help="calibration tokens per forward/backward")


def load_data(a: argparse.Namespace) -> tuple[str, torch.nn.Module, list, list[torch.Tensor], int, dict]:
    """The device, the dense float32 model on it, the held-out blocks, the calibration batches, sequences per batch and
    what the data are (for the provenance)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = load_tokenizer(a.model)
    dense = load_model(a.model, dtype="float32").to(device)
    held_text, calib_text = Text(split="test", join="\n\n"), Text()
    held = blocks(held_text, tok, a.held_len + 1, a.held_out, "val", "--held_out")
    samples, length = (int(x) for x in a.calibration.split("x"))
    calib = blocks(calib_text, tok, length + 1, samples, "train", "--calibration")
    per_batch = max(1, a.batch_tokens // length)
    batches = [torch.stack(calib[i:i + per_batch]).to(device) for i in range(0, samples, per_batch)]
    data = {"calibration": f"{calib_text.path} ({calib_text.name}, {calib_text.split}; offline: english-passages "
                           f"train), {samples} x {length} tokens",
            "held_out": f"{held_text.path} ({held_text.name}, {held_text.split}, rows joined by blank lines; offline: "
                        f"english-passages val), {a.held_out} x {a.held_len} tokens"}
    return device, dense, held, batches, per_batch, data


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True, help="a Hugging Face directory or hub id")
    p.add_argument("--part", choices=["structured", "element", "all"], default="all")
    p.add_argument("--sparsity", type=float, default=0.2, help="structured: share of the decoder linears removed")
    p.add_argument("--element", type=float, default=0.5, help="unstructured: share of each linear removed")
    add_data_arguments(p, calibration="128x2048", held_out=64)
    a = p.parse_args()
    device, dense, held, batches, per_batch, data = load_data(a)
    samples, length = (int(x) for x in a.calibration.split("x"))
    results = {"provenance": provenance(a.model, data), "settings": vars(a), "dense_ppl": perplexity(dense, held),
               "runs": []}
    suffix = "" if a.part == "all" else f"_{a.part}"
    out = result_path(f"surgeon_quality{suffix}.json")
    print(f"dense held-out perplexity {results['dense_ppl']:.2f}", flush=True)
    print(f"{'method':<34}{'sparsity':>9}{'ppl':>12}{'seconds':>9}")
    for name, (part, settings) in arms(a).items():
        if a.part not in ("all", part):
            continue
        spec = pruner_from(dict(settings, **({"calibration_samples": samples, "seq_len": length,
                                              "batch_size": per_batch} if settings["method"] != "magnitude" else {})))
        model = copy.deepcopy(dense)
        torch.cuda.synchronize() if device == "cuda" else None
        t0 = time.perf_counter()
        report = spec.prune(model, batches)
        seconds = time.perf_counter() - t0
        run = {"method": name, "part": part, "settings": settings, "ppl": perplexity(model, held),
               "sparsity": 1 - report.params_after / report.params_before, "seconds": seconds}
        results["runs"].append(run)
        print(f"{name:<34}{run['sparsity']:>9.4f}{run['ppl']:>12.2f}{seconds:>9.1f}", flush=True)
        out.write_text(json.dumps(results, indent=2))  # after every run: a cut-off session keeps what it measured
        del model


if __name__ == "__main__":
    main()
