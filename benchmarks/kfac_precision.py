"""Would K-FAC's moment products in TF32 or bf16 (tensor cores; float32 accumulation) prune as well as float32? LLM
Surgeon, structured, from the same dense weights and calibration, with each moment's inputs first rounded to TF32's
10-bit or bf16's 7-bit mantissa (what tensor cores do to a float32 product's inputs) against float32 as chop computes
them today; held-out perplexity right after pruning (in float32), and how far the first block's factors move.

    python benchmarks/kfac_precision.py --model DIR [--calibration 64x128] [--sparsity 0.2] [--shots 2] [--arms ...]

An experiment on the arithmetic, on any device: the rounding is emulated (``chop.pruning.kfac._moment`` wrapped), so
those arms measure the effect on the pruned model, not speed (``kfac_collect.py`` measures speed). On a GPU one more
arm is real: ``tf32 tensor cores``, the whole pruning under ``chop prune --matmul_precision high`` (forward, backward
and moments on TF32 tensor cores), timed beside float32. Calibration and held-out text as ``surgeon_quality.py``
(offline: english-passages train and val). Prints a table, writes kfac_precision.json ($OUT, else
benchmarks/results/).
"""

import argparse
import copy
import functools
import json

import torch

from chop.provenance import provenance
from chop.pruning import kfac
from chop.pruning.prune_cli import float32_matmul_precision, perplexity
from chop.pruning.registry import pruner_from
from chop.pruning.structures import linears
from common import result_path
from gpu_clock import timed
from surgeon_quality import add_data_arguments, load_data


def rounded(x: torch.Tensor, mantissa: int) -> torch.Tensor:
    """float32 ``x`` rounded to ``mantissa`` explicit bits (to nearest, ties away from zero), as float32."""
    drop = 23 - mantissa
    bits = x.float().contiguous().view(torch.int32)
    bits = (bits + (1 << (drop - 1))) & ~((1 << drop) - 1)
    return bits.view(torch.float32)


MANTISSA = {"float32": None, "tf32": 10, "bf16": 7}  # emulated: the moments' inputs rounded, products in float32
REAL = "tf32 tensor cores"  # not emulated: the whole pruning with float32 matmul precision "high" (a GPU)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a Hugging Face directory or hub id")
    p.add_argument("--sparsity", type=float, default=0.2, help="share of the decoder linears removed (structured)")
    add_data_arguments(p, calibration="64x128", held_out=32)
    p.add_argument("--arms", nargs="+", choices=[*MANTISSA, REAL], help="default: all (the real TF32 arm on a GPU)")
    a = p.parse_args()
    cuda = torch.cuda.is_available()
    arms = a.arms or [*MANTISSA, *([REAL] if cuda else [])]
    if REAL in arms and not cuda:
        p.error(f"--arms: '{REAL}' runs on a CUDA GPU's tensor cores, and there is none; leave it out")
    _, dense, held, batches, per_batch, data = load_data(a)
    samples, length = (int(x) for x in a.calibration.split("x"))
    results = {"provenance": provenance(a.model, data, note="moment inputs' rounding emulated in float32; "
                                        f"'{REAL}': real, float32 matmul precision high throughout"),
               "settings": vars(a), "dense_ppl": perplexity(dense, held), "runs": []}
    out = result_path("kfac_precision.json")
    exact = kfac._moment
    first = {n: l for n, l in linears(dense).items() if n.startswith("model.layers.0.")}
    reference = kfac.collect(dense, first, batches)
    print(f"dense held-out perplexity {results['dense_ppl']:.2f}", flush=True)
    print(f"{'moment inputs':<18}{'ppl':>10}{'A rel. err.':>13}{'G rel. err.':>13}{'seconds':>9}")
    try:
        for name in arms:
            bits = MANTISSA.get(name)
            kfac._moment = exact if bits is None else (lambda x, dev, b=bits: exact(rounded(x, b), dev))
            spec = pruner_from({"method": "surgeon", "mode": "structured", "sparsity": a.sparsity, "shots": a.shots,
                                "calibration_samples": samples, "seq_len": length, "batch_size": per_batch})
            model = copy.deepcopy(dense)
            with float32_matmul_precision("high" if name == REAL else "highest"):
                factors = kfac.collect(dense, first, batches)
                seconds = timed(functools.partial(spec.prune, model, batches))[1]
            err = {k: max(((getattr(factors[n], k) - getattr(reference[n], k)).norm()
                           / getattr(reference[n], k).norm()).item() for n in first) for k in ("A", "G")}
            run = {"moment_inputs": name, "mantissa_bits": bits if name != REAL else 10, "ppl": perplexity(model, held),
                   "seconds": seconds, "first_block_rel_err": err}
            results["runs"].append(run)
            print(f"{name:<18}{run['ppl']:>10.2f}{err['A']:>13.2e}{err['G']:>13.2e}{run['seconds']:>9.1f}", flush=True)
            out.write_text(json.dumps(results, indent=2))
            del model
    finally:
        kfac._moment = exact


if __name__ == "__main__":
    main()
