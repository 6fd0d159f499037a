"""Training throughput and MFU of `chop fit` continued pretraining vs a plain PyTorch loop, same model, same run.

    python benchmarks/train_throughput.py --tokenizer DIR --train_files FILE [--steps 200] [--variants ...]

The student is a random-init Llama of about 1.1B parameters (hidden 2048, 22 layers, 32 heads, 4 KV heads,
intermediate 5632, vocab 32000), sequence 2048, batch 8, bf16-mixed (fp32 weights, bf16 autocast), AdamW.
Variants: plain / plain+compile (a hand-written loop over the HF model with random tokens), chop / chop+compile
(Lightning Trainer + ContinuedPretraining + StreamingDataModule reading and tokenizing FILE with 4 workers).
Tokens/s are timed from step `--warmup` to the last step (compilation excluded). MFU uses 6N + 12*L*d*s FLOPs per
token over a 989 TFLOP/s peak. Prints a table and writes benchmarks/results/train_throughput.json.
"""

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

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


def step_timer(warmup: int):
    """A Lightning callback that times training from optimizer step ``warmup`` (t0) to the end (t1)."""
    import lightning as L

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, *_):
            if trainer.global_step == warmup:
                torch.cuda.synchronize()
                self.t0 = time.perf_counter()

        def on_train_end(self, trainer, *_):
            torch.cuda.synchronize()
            self.t1 = time.perf_counter()

    return Timer()


def chop_fit(args, compile_: bool) -> float:
    import lightning as L

    from chop.training.pretraining_data import StreamingDataModule
    from chop.training.optim import Optim
    from chop.training.pretrain import ContinuedPretraining

    timer = step_timer(args.warmup)
    model = ContinuedPretraining(tokenizer=args.tokenizer, config=LLAMA_1B, dtype="float32", compile=compile_,
                                 optim=Optim(lr=3e-4, warmup_steps=10), export_on_end=False)
    data = StreamingDataModule(tokenizer=args.tokenizer, train_files=[args.train_files], seq_len=args.seq,
                               batch_size=args.batch, num_workers=4, shuffle_buffer=1000)
    trainer = L.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=args.steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0,
                        gradient_clip_val=1.0, callbacks=[timer], enable_model_summary=False)
    trainer.fit(model, data)
    return (args.steps - args.warmup) * args.batch * args.seq / (timer.t1 - timer.t0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokenizer", required=True, help="a tokenizer directory with at most 32000 tokens")
    p.add_argument("--train_files", required=True)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--variants", default="plain,chop,plain+compile,chop+compile")
    args = p.parse_args()
    from chop.models.loading import load_model
    from chop.training.flops import ModelSize

    with torch.device("meta"):
        flops = ModelSize.of(load_model(config=LLAMA_1B)).train_flops(args.seq)
    n = sum(p.numel() for p in load_model(config=LLAMA_1B).parameters())
    results = {"gpu": torch.cuda.get_device_name(), "params": n, "flops_per_token": flops, "batch": args.batch,
               "seq": args.seq, "steps": args.steps, "warmup": args.warmup, "variants": {}}
    print(f"GPU {results['gpu']}, {n / 1e9:.3f}B parameters, {flops / 1e9:.2f} GFLOP/token")
    for v in args.variants.split(","):
        fn = plain if v.startswith("plain") else chop_fit
        tps = fn(args, compile_=v.endswith("+compile"))
        results["variants"][v] = {"tokens_per_s": tps, "mfu": tps * flops / PEAK}
        print(f"{v:<16}{tps:>12,.0f} tokens/s   MFU {tps * flops / PEAK:6.1%}", flush=True)
        torch.cuda.empty_cache()
    out = Path(os.environ.get("OUT", Path(__file__).parent / "results")) / "train_throughput.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
