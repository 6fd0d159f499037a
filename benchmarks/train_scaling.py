"""`chop fit` on 1 and on N GPUs of one host, in one run: tokens/s, scaling and MFU for continued pretraining of a
1.17B Llama and for distillation of that student from the 2.1B Llama it was chopped from; and what share of the
corpus each data worker reads.

    python benchmarks/train_scaling.py --tokenizer DIR --corpus FILE.jsonl [--devices 1 2] [--arms cpt distill]

Models (random init; vocabulary = the tokenizer's): the TinyLlama shape (hidden 2048, 22 layers, 32 heads, 4 KV heads,
intermediate 5632); the teacher has 44 such layers and the student keeps 22 of them (chop `input`). Both arms use
the recipes' strategy (FSDP, full shard, one unit per decoder layer), bf16-mixed, AdamW, sequence 2048, batch 8 per
GPU. The corpus is split into `--parts` jsonl files so that each of ranks x 4 workers reads its own files.
Tokens/s (all GPUs) are timed from step `--warmup` to the last; MFU = tokens/s per GPU x FLOPs per token / 989
TFLOP/s, the FLOPs per token being the module's own count (student 6N + 12 L d s; distillation adds the teacher's
forward, 2N + 4 L d s). Each (arm, devices) runs in its own process group; the table and
benchmarks/results/train_scaling.json (GPU, commit, settings, data) come out at the end.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from common import result_path

PEAK = 989e12
LLAMA = dict(model_type="llama", hidden_size=2048, num_attention_heads=32, num_key_value_heads=4,
             intermediate_size=5632, max_position_embeddings=2048, tie_word_embeddings=False)


def worker(a) -> None:
    """One `chop fit` (this process is rank 0; Lightning starts the others): writes rank 0's figures to a.result."""
    import lightning as L
    from lightning.pytorch.strategies import FSDPStrategy

    from chop.data import text
    from chop.training.pretraining_data import StreamingDataModule
    from chop.models.loading import load_tokenizer
    from chop.training.distill import Distillation, DistillLoss
    from chop.training.optim import Optim
    from chop.training.pretrain import ContinuedPretraining
    from train_throughput import step_timer  # this script's folder is on the path

    rows = text.Source.rows

    def counted(self, part, start=0):  # which files each rank x worker opens
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        with open(a.result + ".reads", "a") as f:
            # "main": a rank's own process, which reads the first document before training to check the source
            f.write(json.dumps({"rank": int(os.environ.get("LOCAL_RANK", 0)), "worker": info.id if info else "main",
                                "part": part}) + "\n")
        yield from rows(self, part, start)

    text.Source.rows = counted

    vocab = len(load_tokenizer(a.tokenizer))
    common = dict(tokenizer=a.tokenizer, dtype="float32", optim=Optim(lr=3e-4, warmup_steps=10), export_on_end=False)
    if a.arm == "cpt":
        module = ContinuedPretraining(config={**LLAMA, "vocab_size": vocab, "num_hidden_layers": 22}, **common)
    else:
        module = Distillation(config={**LLAMA, "vocab_size": vocab, "num_hidden_layers": 44},
                              chop={"strategy": "input", "n_keep": 22}, loss=DistillLoss(lm=1.0, logits=1.0), **common)
    files = sorted(str(p) for p in Path(a.parts_dir).glob("*.jsonl"))
    data = StreamingDataModule(tokenizer=a.tokenizer, train_files=files, seq_len=a.seq, batch_size=a.batch,
                               num_workers=4, shuffle_buffer=1000, val_docs=0)
    timer = step_timer(a.warmup)
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    strategy = FSDPStrategy(auto_wrap_policy={LlamaDecoderLayer}, state_dict_type="full")
    trainer = L.Trainer(accelerator="gpu", devices=a.devices, strategy=strategy, precision="bf16-mixed",
                        max_steps=a.steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=0, gradient_clip_val=1.0, callbacks=[timer], enable_model_summary=False)
    trainer.fit(module, data)
    if trainer.is_global_zero:
        tokens = (a.steps - a.warmup) * a.batch * a.seq * a.devices
        seconds = timer.t1 - timer.t0
        Path(a.result).write_text(json.dumps({
            "tokens_per_s": tokens / seconds, "seconds": seconds, "flops_per_token": module.flops_per_token(a.seq),
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}))


def split_corpus(corpus: str, parts: int, folder: Path) -> int:
    lines = [line for line in open(corpus) if line.strip()]
    for i in range(parts):
        (folder / f"part-{i:02d}.jsonl").write_text("".join(lines[i::parts]))
    return len(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--corpus", required=True, help="a jsonl file with a 'text' field (split into --parts files)")
    p.add_argument("--devices", type=int, nargs="+", default=[1, 2])
    p.add_argument("--arms", nargs="+", default=["cpt", "distill"], choices=["cpt", "distill"])
    p.add_argument("--parts", type=int, default=16)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=15)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--arm", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--parts_dir", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        a.devices = a.devices[0]
        return worker(a)
    tmp = Path(tempfile.mkdtemp())
    docs = split_corpus(a.corpus, a.parts, tmp)
    commit = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=40"], capture_output=True,
                            text=True).stdout.strip()
    out = {"gpu": torch.cuda.get_device_name(), "gpus": torch.cuda.device_count(), "commit": commit,
           "model": "random-init Llama (TinyLlama shape), vocabulary of " + a.tokenizer,
           "data": {"corpus": a.corpus, "split": "train", "documents": docs, "files": a.parts},
           "settings": {k: getattr(a, k) for k in ("steps", "warmup", "batch", "seq")},
           "strategy": "FSDP full shard, LlamaDecoderLayer units, bf16-mixed", "runs": []}
    dest = result_path("train_scaling_h200.json")
    print(f"{out['gpu']} x {out['gpus']}, commit {commit[:8]}, corpus {docs} documents in {a.parts} files")
    print(f"{'arm':<9}{'GPUs':>5}{'tokens/s':>12}{'per GPU':>10}{'scaling':>9}{'MFU':>7}{'GiB':>6}  files opened per worker")
    for arm in a.arms:
        base = None
        for n in a.devices:
            result = tmp / f"{arm}-{n}.json"
            cmd = [sys.executable, __file__, "--worker", "--arm", arm, "--devices", str(n), "--result", str(result),
                   "--parts_dir", str(tmp), "--tokenizer", a.tokenizer, "--corpus", a.corpus,
                   *[f"--{k}={getattr(a, k)}" for k in ("steps", "warmup", "batch", "seq")]]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-3000:])
                raise SystemExit(f"{arm} on {n} GPUs failed")
            r = json.loads(result.read_text())
            reads = [json.loads(line) for line in open(str(result) + ".reads")]
            opened: dict = {}
            for x in reads:
                if x["worker"] != "main":
                    opened.setdefault((x["rank"], x["worker"]), set()).add(x["part"])
            counts = sorted(len(v) for v in opened.values())
            all_parts = set().union(*opened.values())
            shared = sum(counts) - len(all_parts)  # files that two workers opened
            base = base or r["tokens_per_s"]
            r.update(arm=arm, devices=n, scaling=r["tokens_per_s"] / base,
                     mfu=r["tokens_per_s"] / n * r["flops_per_token"] / PEAK,
                     files_opened_per_worker=counts, workers=len(opened), files_read=len(all_parts),
                     files_opened_by_two_workers=shared,
                     files_expected_per_worker=a.parts / (n * 4))
            out["runs"].append(r)
            dest.write_text(json.dumps(out, indent=2))  # after every run: a cut-short benchmark keeps what it measured
            print(f"{arm:<9}{n:>5}{r['tokens_per_s']:>12,.0f}{r['tokens_per_s'] / n:>10,.0f}{r['scaling']:>8.2f}x"
                  f"{r['mfu']:>7.1%}{r['peak_memory_gib']:>6.0f}  {counts} of {a.parts} "
                  f"(1/(R*W) = {a.parts / (n * 4):g}), {shared} opened by two", flush=True)


if __name__ == "__main__":
    main()
