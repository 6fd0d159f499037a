"""Step time of distillation vs continued pretraining of the same student, beside the predicted ratio.

    python benchmarks/distill_overhead.py [--steps 20] [--batch 4] [--seq 2048] [--chunk N] [--kernels liger]

The models of distill_memory.py: a 1.24B student (a 28 -> 16 layer chop of a 1.97B Llama-3.2-shaped teacher,
vocabulary 128,256), bf16 autocast, fp32 AdamW student, bf16 teacher. Each arm runs 3 warm-up steps and then
``--steps`` timed ones; the median is compared with 1 + 2 N_teacher / (6 N_student) (parameters only) and with chop's
FLOP ratio (attention included), which is also what the two arms log as train/flops. Both paths of the logit
losses are timed (chunked and all-at-once). Prints a table and writes distill_overhead.json (to $OUT, else
benchmarks/results/).
"""

import argparse
import json

import torch
from distill_memory import KEEP, TEACHER, measure

from chop.training.losses import chunk_for
from common import result_path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--chunk", type=int, default=None, help="tokens per chunk on the chunked path (default: chop's)")
    p.add_argument("--kernels", default="torch", choices=["torch", "liger"],
                   help="model.kernels of both arms (liger: fused RMSNorm, rotary, SwiGLU; pretraining's loss in "
                        "liger's fused linear cross-entropy; chop's chunked path only)")
    args = p.parse_args()
    runs = {}
    paths = (("chunked", args.chunk), ("naive", 0)) if args.kernels == "torch" else (("chunked", args.chunk),)
    for kind in ("pretrain", "distill"):
        for path, chunk in paths:
            runs[f"{kind}/{path}"] = measure(kind, chunk, args, timed=args.steps)
            print(f"{kind}/{path}", json.dumps(runs[f"{kind}/{path}"]), flush=True)
    n_s, n_t = runs["distill/chunked"]["student_params"], runs["distill/chunked"]["teacher_params"]
    d, s = TEACHER["hidden_size"], args.seq
    student_flops = 6 * n_s + 12 * KEEP * d * s
    teacher_flops = 2 * n_t + 4 * TEACHER["num_hidden_layers"] * d * s
    predicted = {"params": 1 + 2 * n_t / (6 * n_s), "flops": 1 + teacher_flops / student_flops}
    from chop.provenance import provenance

    results = {"provenance": provenance(None, {"tokens": "random ids", "batch": args.batch, "seq": s}),
               "gpu": torch.cuda.get_device_name(), "kernels": args.kernels, "batch": args.batch, "seq": s, "chunk": args.chunk or chunk_for(TEACHER["vocab_size"]),
               "steps": args.steps, "student_params": n_s, "teacher_params": n_t, "predicted": predicted, "runs": runs}
    print(f"\n{results['gpu']}: {n_s / 1e9:.2f}B student, {n_t / 1e9:.2f}B teacher, batch {args.batch} x {s}, "
          f"median of {args.steps} steps")
    print(f"{'logit losses':<14}{'pretrain s':>12}{'distill s':>12}{'ratio':>8}{'pred. 1+2Nt/6Ns':>17}"
          f"{'pred. FLOPs':>13}{'vs FLOPs':>10}")
    for path, _ in paths:
        a, b = runs[f"pretrain/{path}"], runs[f"distill/{path}"]
        if "step_s" not in a or "step_s" not in b:
            print(f"{path:<14}{'OOM' if 'oom' in a else a['step_s']:>12}{'OOM' if 'oom' in b else b['step_s']:>12}")
            continue
        ratio = b["step_s"] / a["step_s"]
        results[f"ratio_{path}"] = ratio
        print(f"{path:<14}{a['step_s']:>12.3f}{b['step_s']:>12.3f}{ratio:>8.3f}{predicted['params']:>17.3f}"
              f"{predicted['flops']:>13.3f}{ratio / predicted['flops'] - 1:>+10.1%}")
        results[f"vs_flops_{path}"] = ratio / predicted["flops"] - 1
    out = result_path("distill_overhead.json")
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
