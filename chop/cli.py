"""``python -m chop <fit|validate|test|export|eval|prune> ...``: LightningCLI for training, plus chop's own
subcommands; each imports what it needs, so that ``chop eval`` of an HF model starts without Lightning."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional


def export(ckpt: str, out: str) -> Path:
    """Write the model of a chop Lightning checkpoint, and its tokenizer, as a Hugging Face directory."""
    if Path(out).exists() and any(Path(out).iterdir()):
        raise FileExistsError(f"--out: '{out}' exists and is not empty; choose another directory")
    from chop.models.checkpoint import export_hf, model_from_checkpoint

    model, tokenizer = model_from_checkpoint(ckpt)
    return export_hf(model, tokenizer, Path(out))


def export_main(args: list[str]) -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="chop export", description=export.__doc__)
    parser.add_argument("--ckpt", required=True, help="a chop Lightning checkpoint (.ckpt)")
    parser.add_argument("--out", required=True, help="the Hugging Face directory to write (must not exist, or be empty)")
    cfg = parser.parse_args(args)
    print(export(cfg.ckpt, cfg.out))


def eval_main(args: list[str]) -> None:
    from chop.eval.eval_cli import main

    main(args)


def prune_main(args: list[str]) -> None:
    from chop.pruning.prune_cli import main

    main(args)


SUBCOMMANDS = {"export": export_main, "eval": eval_main, "prune": prune_main}


def main(args: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if args is None else args
    if argv and argv[0] in SUBCOMMANDS:
        SUBCOMMANDS[argv[0]](argv[1:])
    else:
        from chop.training.cli import cli_main

        cli_main(args)
