"""Training throughput and MFU of `chop fit` continued pretraining vs a plain PyTorch loop, same model, same run.

    python benchmarks/train_throughput.py --tokenizer DIR --train_files FILE [--steps 200] [--variants ...]

The student is a random-init Llama of about 1.1B parameters (hidden 2048, 22 layers, 32 heads, 4 KV heads,
intermediate 5632, vocab 32000), sequence 2048, bf16-mixed (fp32 weights, bf16 autocast), AdamW.
A variant is `plain` (a hand-written loop over the HF model with random tokens) or `chop` (Lightning Trainer +
ContinuedPretraining + StreamingDataModule reading and tokenizing FILE with 4 workers), then any of `+compile`
(torch.compile: the whole model for plain, the body for chop's `model.compile`), `+liger` (chop's
`model.kernels: liger`; with +compile, liger's fused cross-entropy alone), `+bf16res` (chop's
`model.residual_dtype: bfloat16`: the residual stream in bf16), `+cudnn`/`+flash`/`+efficient` (chop's
`model.sdpa_backend`: SDPA tries that backend first; the JSON records the attention kernels a probe of the model's
attention shapes ran under it) and `@B` (micro-batch B, default --batch). Each variant runs in its own process (liger
patches transformers' modules for the whole process). Tokens/s are timed from step `--warmup` to the last step
(compilation excluded); `--profile N` then records the CUDA kernels of N more steps of each chop variant (GPU time
per step by kind of kernel). MFU uses 6N + 12*L*d*s FLOPs per token over a 989 TFLOP/s peak (dense bf16, H100/H200).
Prints a table and writes train_throughput.json ($OUT, else benchmarks/results/) with its provenance.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from common import result_path

LLAMA_1B = dict(model_type="llama", hidden_size=2048, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, intermediate_size=5632, vocab_size=32000, max_position_embeddings=2048,
                bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
PEAK = 989e12


def plain(args, compile_: bool) -> float:
    from chop.models.loading import load_model

    model = load_model(config=LLAMA_1B, attn_implementation="sdpa").cuda().train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    fwd = torch.compile(model) if compile_ else model
    g = torch.Generator(device="cuda").manual_seed(0)
    t0 = None
    for step in range(args.steps):
        if step == args.warmup:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        ids = torch.randint(0, 32000, (args.batch, args.seq + 1), device="cuda", generator=g)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = fwd(input_ids=ids[:, :-1], use_cache=False).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return (args.steps - args.warmup) * args.batch * args.seq / (time.perf_counter() - t0)


# Kinds of CUDA kernels, by what their names contain (first match), for --profile.
KINDS = [("attention", ("fmha", "flash", "sdpa", "attention", "attn", "dot_do_o")),  # before matmul: cuDNN's say wgmma
         ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "wgmma")),
         ("norm (RMSNorm)", ("rms_norm", "rmsnorm")), ("SwiGLU", ("swiglu", "silu")), ("rotary", ("rope",)),
         ("cross-entropy", ("cross_entropy", "element_mul", "log_softmax", "nll_loss")),
         ("optimizer, clipping", ("adam", "multi_tensor", "lpnorm", "foreach")),
         ("embedding", ("embedding", "index", "scatter", "sort", "radix")),
         ("elementwise, casts, reductions", ("elementwise", "reduce", "copy", "fill", "cat"))]


def kind_of(kernel: str) -> str:
    name = kernel.lower()
    return next((kind for kind, keys in KINDS if any(k in name for k in keys)), "other")


def step_timer(warmup: int, end: int, profile: int = 0):
    """A Lightning callback that times training from optimizer step ``warmup`` (t0) to step ``end`` or the end (t1),
    and with ``profile`` > 0 records the CUDA kernels of the ``profile`` steps after ``end`` (``self.profile``: GPU
    milliseconds per step by kind of kernel, the step's wall time, and the kernels that took longest)."""
    import lightning as L

    class Timer(L.Callback):
        profile: dict = {}

        def on_train_batch_start(self, trainer, *_):
            step = trainer.global_step
            if step in (warmup, end, end + profile):
                torch.cuda.synchronize()
            if step == warmup:
                self.t0 = time.perf_counter()
            elif step == end:
                self.t1 = time.perf_counter()
                if profile:
                    self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
                    self.prof.__enter__()
            elif profile and step == end + profile:
                self.prof.__exit__(None, None, None)
                self.profile = summarise(self.prof, profile, time.perf_counter() - self.t1)

        def on_train_end(self, trainer, *_):
            torch.cuda.synchronize()
            if not hasattr(self, "t1"):
                self.t1 = time.perf_counter()

    return Timer()


def summarise(prof, steps: int, wall_s: float) -> dict:
    """Per step: GPU milliseconds by kind of kernel, their sum (busy), the wall time (the profiler's own cost on the
    host included: compare busy with the timed steps' time), and the 15 longest kernels."""
    kinds: dict[str, float] = {}
    names: dict[str, float] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            ms = (e.time_range.end - e.time_range.start) / 1e3 / steps
            kinds[kind_of(e.name)] = kinds.get(kind_of(e.name), 0.0) + ms
            names[e.name[:100]] = names.get(e.name[:100], 0.0) + ms
    top = dict(sorted(names.items(), key=lambda kv: -kv[1])[:15])
    return {"steps": steps, "wall_ms_per_step": 1e3 * wall_s / steps, "gpu_busy_ms_per_step": sum(kinds.values()),
            "by_kind_ms_per_step": dict(sorted(kinds.items(), key=lambda kv: -kv[1])), "longest_kernels_ms": top}


def chop_fit(args, compile_: bool, kernels: str = "torch", sdpa: Optional[str] = None,
             residual: str = "float32") -> tuple[float, dict]:
    """``chop fit``'s tokens/s from step ``--warmup`` to ``--steps``, and the ``--profile`` of the steps after."""
    import lightning as L

    from chop.training.pretraining_data import StreamingDataModule
    from chop.training.optim import Optim
    from chop.training.pretrain import ContinuedPretraining

    timer = step_timer(args.warmup, args.steps, args.profile)
    model = ContinuedPretraining(tokenizer=args.tokenizer, config=LLAMA_1B, dtype="float32", compile=compile_,
                                 kernels=kernels, sdpa_backend=sdpa, residual_dtype=residual,
                                 optim=Optim(lr=3e-4, warmup_steps=10), export_on_end=False)
    data = StreamingDataModule(tokenizer=args.tokenizer, train_files=[args.train_files], seq_len=args.seq,
                               batch_size=args.batch, num_workers=4, shuffle_buffer=1000)
    trainer = L.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed",
                        max_steps=args.steps + (args.profile + 1 if args.profile else 0), logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0,
                        gradient_clip_val=1.0, callbacks=[timer], enable_model_summary=False)
    trainer.fit(model, data)
    return (args.steps - args.warmup) * args.batch * args.seq / (timer.t1 - timer.t0), timer.profile


def variant(args, name: str) -> dict:
    """One variant (``plain|chop[+compile][+liger][@batch]``): its tokens/s and peak memory."""
    kind, _, batch = name.partition("@")
    args.batch = int(batch) if batch else args.batch
    parts = kind.split("+")
    if parts[0] == "plain":
        if set(parts) & {"liger", "cudnn", "flash", "efficient", "bf16res"}:
            raise SystemExit(f"--variants: '{name}': +liger, +bf16res and the SDPA backends are chop's switches "
                             f"(model.kernels, model.residual_dtype, model.sdpa_backend); the plain loop has none")
        tps = plain(args, compile_="compile" in parts)
    else:
        sdpa = next((p for p in parts if p in ("cudnn", "flash", "efficient")), None)
        tps, profile = chop_fit(args, compile_="compile" in parts, kernels="liger" if "liger" in parts else "torch",
                                sdpa=sdpa, residual="bfloat16" if "bf16res" in parts else "float32")
        return {"tokens_per_s": tps, "batch": args.batch, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
                "attention_kernels": attention_kernels(args, sdpa), **({"profile": profile} if profile else {})}
    return {"tokens_per_s": tps, "batch": args.batch, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def attention_kernels(args, first) -> list[str]:
    """The CUDA kernels SDPA runs (forward and backward) for this model's attention shapes (32 query heads over 4
    key/value heads, head dim 64, causal, bf16, as transformers calls it) when ``first`` is tried first."""
    from chop.models.kernels import sdpa_backend

    q = torch.randn(args.batch, 32, args.seq, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    kv = [torch.randn(args.batch, 4, args.seq, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
          for _ in range(2)]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        with sdpa_backend(first):
            out = F.scaled_dot_product_attention(q, *kv, is_causal=True, enable_gqa=True)
        out.sum().backward()
        torch.cuda.synchronize()
    return sorted({e.name[:80] for e in prof.events() if "attn" in e.name.lower() or "attention" in e.name.lower()
                   or "fmha" in e.name.lower() or "flash" in e.name.lower() or "cudnn" in e.name.lower()})


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokenizer", required=True, help="a tokenizer directory with at most 32000 tokens")
    p.add_argument("--train_files", required=True)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--variants", default="plain+compile,chop,chop+compile,chop+liger,chop+liger@16,chop+liger+compile@16")
    p.add_argument("--profile", type=int, default=0, help="chop variants: record the CUDA kernels of this many "
                   "steps after the timed ones (GPU time per step by kind of kernel, in the JSON)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run this variant and write its result to --result
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        Path(args.result).write_text(json.dumps(variant(args, args.one)))
        return
    from transformers import AutoTokenizer

    if len(AutoTokenizer.from_pretrained(args.tokenizer)) > LLAMA_1B["vocab_size"]:
        raise SystemExit(f"--tokenizer: {args.tokenizer} has more than {LLAMA_1B['vocab_size']} tokens, the model's "
                         f"vocabulary; make one with benchmarks/make_tokenizer.py --vocab {LLAMA_1B['vocab_size']}")
    from chop.models.loading import load_model
    from chop.provenance import provenance
    from chop.training.flops import ModelSize

    with torch.device("meta"):
        model = load_model(config=LLAMA_1B)
    flops, n = ModelSize.of(model).train_flops(args.seq), sum(p.numel() for p in model.parameters())
    results = {"provenance": provenance(None, {"train_files": args.train_files, "note": "tokens of FILE for chop, "
                                                "random ids for plain"}),
               "params": n, "flops_per_token": flops, "seq": args.seq, "steps": args.steps, "warmup": args.warmup,
               "peak_flops": PEAK, "mfu": "tokens/s x flops_per_token / peak_flops", "variants": {}}
    print(f"GPU {results['provenance']['gpu']}, {n / 1e9:.3f}B parameters, {flops / 1e9:.2f} GFLOP/token, "
          f"MFU over {PEAK / 1e12:.0f} TFLOP/s")
    print(f"{'variant':<26}{'batch':>6}{'tokens/s':>12}{'MFU':>8}{'peak GiB':>10}")
    for v in args.variants.split(","):
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            cmd = [sys.executable, __file__, "--one", v, "--result", f.name, "--tokenizer", args.tokenizer,
                   "--train_files", args.train_files, "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--batch", str(args.batch), "--seq", str(args.seq), "--profile", str(args.profile)]
            done = subprocess.run(cmd, stdout=sys.stderr)
            if done.returncode:
                results["variants"][v] = {"failed": done.returncode}
                print(f"{v:<26}failed ({done.returncode}; its output is above)", flush=True)
                continue
            r = json.loads(Path(f.name).read_text())
        r["mfu"] = r["tokens_per_s"] * flops / PEAK
        results["variants"][v] = r
        print(f"{v:<26}{r['batch']:>6}{r['tokens_per_s']:>12,.0f}{r['mfu']:>8.1%}{r['peak_gib']:>10.1f}", flush=True)
        if "profile" in r:
            prof = r["profile"]
            print(f"  a profiled step: {prof['wall_ms_per_step']:.1f} ms (the profiler's cost included), GPU busy "
                  f"{prof['gpu_busy_ms_per_step']:.1f} ms: "
                  + ", ".join(f"{k} {ms:.1f}" for k, ms in prof["by_kind_ms_per_step"].items()), flush=True)
        write(results)  # after every variant: a run cut off later keeps what it measured
    ratios = [f"{v} {r['vs_plain_compiled']:.2f}x" for v, r in results["variants"].items() if "vs_plain_compiled" in r]
    if ratios:
        print("vs plain+compile: " + ", ".join(ratios))


def write(results: dict) -> None:
    """The JSON so far, with each variant's ratio to the plain compiled loop where that has run."""
    base = results["variants"].get("plain+compile", {}).get("tokens_per_s")
    for r in results["variants"].values():
        if base and "tokens_per_s" in r:
            r["vs_plain_compiled"] = r["tokens_per_s"] / base
    out = result_path("train_throughput.json")
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
