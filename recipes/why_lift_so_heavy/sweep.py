"""Accuracy against depth: prompt-fine-tune one config at several numbers of kept layers, test each, and write a
table (results.md, results.json), a plot (accuracy_vs_layers.png) and the same into TensorBoard (<out>/sweep).

    python recipes/why_lift_so_heavy/sweep.py --config configs/smollm2_sst2_fewshot.yaml --n_keep 1 2 4 8 15 all \
        --out checkpoints/sweep_sst2

Each run is ``python -m chop fit --config CONFIG --model.chop.n_keep N`` (``all``: ``--model.chop null``) then
``test`` on the held-out set with the trained weights; extra arguments after ``--`` go to every run.
"""

import argparse
import json
from pathlib import Path


def run(config: str, n_keep: str, out: Path, extra: list[str]) -> dict:
    from chop.training.cli import cli_main
    from chop.pruning.layerchop import num_params

    chop = ["--model.chop", "null"] if n_keep == "all" else ["--model.chop.n_keep", n_keep]
    cli = cli_main(["fit", "--config", config, *chop, "--trainer.logger.init_args.save_dir", str(out),
                    "--trainer.logger.init_args.name", f"keep_{n_keep}", *extra])
    metrics = cli.trainer.test(cli.model, datamodule=cli.datamodule)[0]
    model = cli.model.model
    return {"layers": model.config.get_text_config().num_hidden_layers, "params": num_params(model),
            "test_acc": metrics["test/acc"], "test_f1": metrics["test/f1"]}


def report(rows: list[dict], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torch.utils.tensorboard import SummaryWriter

    lines = ["| layers kept | parameters | test accuracy | macro-F1 |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['layers']} | {r['params'] / 1e6:.1f}M | {r['test_acc']:.4f} | {r['test_f1']:.4f} |" for r in rows]
    table = "\n".join(lines)
    print(table)
    (out / "results.md").write_text(f"{title}\n\n{table}\n")
    (out / "results.json").write_text(json.dumps({"title": title, "runs": rows}, indent=2))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["layers"] for r in rows], [r["test_acc"] for r in rows], "o-", label="accuracy")
    ax.plot([r["layers"] for r in rows], [r["test_f1"] for r in rows], "s--", label="macro-F1")
    ax.set_xscale("log", base=2)
    ax.set_xticks([r["layers"] for r in rows], [str(r["layers"]) for r in rows])
    ax.set_xlabel("layers kept (bottom)")
    ax.set_ylabel("held-out score")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_layers.png", dpi=120)
    writer = SummaryWriter(str(out / "sweep"))
    for r in rows:
        writer.add_scalar("sweep/test_acc", r["test_acc"], r["layers"])
        writer.add_scalar("sweep/test_f1", r["test_f1"], r["layers"])
    writer.add_figure("sweep/accuracy_vs_layers", fig)
    writer.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--n_keep", nargs="+", required=True, help="numbers of bottom layers to keep, or 'all'")
    p.add_argument("--out", required=True, help="a new folder for the runs and the report")
    p.add_argument("--title", default=None)
    p.add_argument("extra", nargs="*", help="after --: arguments for every run, e.g. --data.seed 1")
    args = p.parse_args()
    for n in args.n_keep:
        if n != "all" and not (n.isdigit() and int(n) >= 1):
            raise SystemExit(f"--n_keep: '{n}' is not a positive number of layers or 'all'")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"--out: '{out}' exists and is not empty; choose a new folder")
    out.mkdir(parents=True, exist_ok=True)
    rows = [run(args.config, n, out, args.extra) for n in args.n_keep]
    report(sorted(rows, key=lambda r: r["layers"]), out, args.title or f"{Path(args.config).stem}")


if __name__ == "__main__":
    main()
