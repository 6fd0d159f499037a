"""Does a bf16 residual stream (``model.residual_dtype: bfloat16``) train as well as the float32 one? Continued
pretraining of a chopped model twice from the same weights, seed and data order, once with each, under bf16-mixed:
the training loss side by side, and the held-out loss at the end.

    python benchmarks/residual_quality.py --model DIR --train_files FILE [--n_keep 15] [--steps 300]

The model is chopped to its first ``--n_keep`` layers' Just CHOP placement (``input``: the first and last kept), as
in configs/quickstart.yaml; the held-out text is the first ``--val_docs`` documents of FILE (kept out of training).
Prints a table and writes residual_quality.json ($OUT, else benchmarks/results/) with its provenance.
"""

import argparse
import json
import statistics

import lightning as L
from common import result_path


class Losses(L.Callback):
    """Each training step's loss."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, *_):
        self.losses.append(float(outputs["loss"]))


def train(args, residual: str) -> dict:
    from chop.training.optim import Optim
    from chop.training.pretrain import ContinuedPretraining
    from chop.training.pretraining_data import StreamingDataModule

    L.seed_everything(0)
    model = ContinuedPretraining(name=args.model, dtype="float32", chop={"strategy": "input", "n_keep": args.n_keep},
                                 kernels=args.kernels, residual_dtype=residual, export_on_end=False,
                                 optim=Optim(lr=args.lr, warmup_steps=args.steps // 10))
    data = StreamingDataModule(tokenizer=args.model, train_files=[args.train_files], seq_len=args.seq,
                               batch_size=args.batch, num_workers=2, shuffle_buffer=500, val_docs=args.val_docs,
                               val_blocks=args.val_blocks)
    losses = Losses()
    trainer = L.Trainer(accelerator=args.device, devices=1, precision="bf16-mixed", max_steps=args.steps,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, callbacks=[losses],
                        gradient_clip_val=1.0, val_check_interval=args.steps, check_val_every_n_epoch=None,
                        limit_val_batches=args.val_blocks, num_sanity_val_steps=0, enable_model_summary=False)
    trainer.fit(model, data)
    return {"losses": losses.losses, "val_loss": float(trainer.callback_metrics["val/loss"])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a Hugging Face directory (with its tokenizer)")
    p.add_argument("--train_files", required=True)
    p.add_argument("--n_keep", type=int, default=15)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--val_docs", type=int, default=200)
    p.add_argument("--val_blocks", type=int, default=32)
    p.add_argument("--kernels", default="torch", choices=["torch", "liger"])
    p.add_argument("--device", default="gpu", help="cpu: a quick check of the script itself")
    args = p.parse_args()
    from chop.provenance import provenance

    runs = {residual: train(args, residual) for residual in ("float32", "bfloat16")}
    window = max(1, args.steps // 10)  # the last tenth of training, averaged
    summary = {r: {"first_loss": v["losses"][0], "last_tenth_mean_loss": statistics.fmean(v["losses"][-window:]),
                   "val_loss": v["val_loss"]} for r, v in runs.items()}
    gap = [b - a for a, b in zip(runs["float32"]["losses"], runs["bfloat16"]["losses"])]
    record = {"provenance": provenance(args.model, {"train_files": args.train_files,
                                                    "held_out": f"the file's first {args.val_docs} documents"}),
              "settings": vars(args), "summary": summary,
              "loss_difference_last_tenth": {"mean": statistics.fmean(gap[-window:]),
                                             "max_abs": max(abs(g) for g in gap[-window:])},
              "losses": {r: v["losses"] for r, v in runs.items()}}
    print(f"{'residual':<10}{'first loss':>12}{'last tenth':>12}{'held-out':>10}")
    for r, v in summary.items():
        print(f"{r:<10}{v['first_loss']:>12.4f}{v['last_tenth_mean_loss']:>12.4f}{v['val_loss']:>10.4f}")
    out = result_path("residual_quality.json")
    out.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
