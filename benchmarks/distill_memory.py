"""Peak GPU memory of a distillation training step: logit losses in chunks (chop's path) vs all logits at once.

    python benchmarks/distill_memory.py [--batch 4] [--seq 2048] [--chunk N]

Teacher: a random-init Llama of 1.97B parameters in the shape of Llama-3.2 (hidden 2048, 28 layers, 32 heads,
8 KV heads, MLP 8192, vocabulary 128,256, tied embeddings), bf16. Student: its `input` chop to 16 layers (1.24B),
fp32 weights under bf16 autocast, AdamW. Losses: LM cross-entropy + forward KL at T=2. For each path, three figures:
the peak of a whole training step; the peak above the static memory (weights, optimizer states, teacher) that the
step itself adds; and the peak of the logit losses alone (forward and backward from the two models' final hidden
states), where chunking acts. ``--gradient_checkpointing`` recomputes the student's layers in the backward, as
memory-bound runs do, so that the layers' activations no longer hide the logits' share. Prints a table and writes distill_memory.json (to $OUT, else benchmarks/results/).
"""

import argparse
import json
import statistics
import time

import torch

from chop.training.losses import chunk_for
from common import result_path

TEACHER = dict(model_type="llama", hidden_size=2048, num_hidden_layers=28, num_attention_heads=32,
               num_key_value_heads=8, intermediate_size=8192, vocab_size=128256, max_position_embeddings=4096,
               tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
KEEP = 16
GB = 2**30


def build(kind: str, chunk: int, checkpointing: bool = False, kernels: str = "torch"):
    """The chopped student as ``ContinuedPretraining`` or ``Distillation`` (teacher: the unchopped model), on GPU."""
    from chop.pruning.layerchop import LayerChop
    from chop.training import optim
    from chop.training.distill import Distillation, DistillLoss
    from chop.training.pretrain import ContinuedPretraining

    common = dict(config=TEACHER, chop=LayerChop("input", n_keep=KEEP), logit_chunk=chunk, export_on_end=False,
                  gradient_checkpointing=checkpointing, kernels=kernels,
                  optim=optim.Optim(lr=3e-4, warmup_steps=10))
    if kind == "distill":
        module = Distillation(**common, teacher_dtype="bfloat16",
                              loss=DistillLoss(lm=1.0, logits=1.0, divergence="forward_kl", temperature=2.0))
    else:
        module = ContinuedPretraining(**common)
    with torch.device("cuda"):  # as Lightning does: chop builds on the CPU, then moves the model here
        module.configure_model()
    module.cuda().train()
    opt = optim.build(module, module.optim_cfg, 1000)["optimizer"]
    return module, opt


def train_step(module, opt, ids: torch.Tensor) -> None:
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = module.training_loss(ids[:, :-1], ids[:, 1:])["loss"]
    loss.backward()
    torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def batches(args, n: int):
    g = torch.Generator(device="cuda").manual_seed(0)
    return [torch.randint(0, TEACHER["vocab_size"], (args.batch, args.seq + 1), device="cuda", generator=g)
            for _ in range(n)]


def measure(kind: str, chunk: int, args, timed: int = 0) -> dict:
    """Peak memory of a step (and, with ``timed``, the median step time over that many steps after 3 warm-up)."""
    torch.cuda.empty_cache()
    module, opt = build(kind, chunk, getattr(args, "gradient_checkpointing", False), getattr(args, "kernels", "torch"))
    out: dict = {"student_params": module.model_size.params}
    if kind == "distill":
        out["teacher_params"] = module.teacher_size.params
    data = batches(args, 3 + timed)
    try:
        for ids in data[:2]:  # the first step allocates the optimizer states
            train_step(module, opt, ids)
        torch.cuda.synchronize()
        static = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        train_step(module, opt, data[2])
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        out.update(static_gb=static / GB, step_peak_gb=peak / GB, step_added_gb=(peak - static) / GB)
        times = []
        for ids in data[3:]:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            train_step(module, opt, ids)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        if times:
            out.update(step_s=statistics.median(times), tokens_per_s=args.batch * args.seq / statistics.median(times))
        out["loss_peak_gb"] = loss_only_peak(module, args) / GB
    except torch.cuda.OutOfMemoryError:
        out["oom"] = True
    del module, opt
    torch.cuda.empty_cache()
    return out


def loss_only_peak(module, args) -> int:
    """Memory the logit losses add on top of their inputs (both models' final hidden states), forward + backward."""
    from chop.training.losses import LogitLoss

    g = torch.Generator(device="cuda").manual_seed(1)
    d = TEACHER["hidden_size"]
    hidden = torch.randn(args.batch, args.seq, d, device="cuda", generator=g, requires_grad=True)
    teacher = torch.randn(args.batch, args.seq, d, device="cuda", generator=g, dtype=torch.bfloat16)
    targets = torch.randint(0, TEACHER["vocab_size"], (args.batch, args.seq), device="cuda", generator=g)
    distill = getattr(module, "teacher", None) is not None
    loss = LogitLoss(lm=1.0, distill=1.0 if distill else 0.0, temperature=2.0)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = module.logit_losses(hidden, targets, loss, teacher if distill else None, getattr(module, "_teacher_head", None))
    out["loss"].backward()
    torch.cuda.synchronize()
    module.zero_grad(set_to_none=True)
    return torch.cuda.max_memory_allocated() - base


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--chunk", type=int, default=None, help="tokens per chunk on the chunked path (default: chop's)")
    p.add_argument("--gradient_checkpointing", action="store_true", help="recompute the student's layer activations")
    args = p.parse_args()
    results = {"gradient_checkpointing": args.gradient_checkpointing, "gpu": torch.cuda.get_device_name(), "batch": args.batch, "seq": args.seq, "chunk": args.chunk or chunk_for(TEACHER["vocab_size"]),
               "teacher": TEACHER, "student_layers": KEEP, "paths": {}}
    for name, chunk in (("chunked", args.chunk), ("naive", 0)):
        results["paths"][name] = measure("distill", chunk, args)
        print(name, json.dumps(results["paths"][name]), flush=True)
    c, n = results["paths"]["chunked"], results["paths"]["naive"]
    print(f"\n{results['gpu']}: distillation step, {c['student_params'] / 1e9:.2f}B student, "
          f"{c['teacher_params'] / 1e9:.2f}B teacher, vocab {TEACHER['vocab_size']:,}, batch {args.batch} x {args.seq}, "
          f"chunks of {results['chunk']} tokens{', gradient checkpointing' if args.gradient_checkpointing else ''}")
    print(f"{'peak GiB':<34}{'chunked':>10}{'naive':>10}{'naive/chunked':>15}")
    for key, label in (("step_peak_gb", "whole step"), ("step_added_gb", "added by the step (above static)"),
                       ("loss_peak_gb", "logit losses alone")):
        if "oom" in n:
            print(f"{label:<34}{c[key]:>10.2f}{'OOM':>10}")
        else:
            print(f"{label:<34}{c[key]:>10.2f}{n[key]:>10.2f}{n[key] / c[key]:>15.2f}")
    out = result_path("distill_memory.json")
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
