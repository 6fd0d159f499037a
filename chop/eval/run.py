"""``python -m chop eval``: the zero-shot suite on a Hugging Face directory, a hub id or a chop checkpoint."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional, Union

import torch
from jsonargparse import ArgumentParser

from chop.eval.suite import evaluate, table, to_json


def load(model: str, dtype: str, device: str) -> tuple:
    """Model and tokenizer from an HF directory, a hub id (offline copies as everywhere in chop) or a ``.ckpt``."""
    from chop.models.loading import DTYPES, load_model, load_tokenizer

    if model.endswith(".ckpt"):
        from chop.cli import model_from_checkpoint

        net, tokenizer = model_from_checkpoint(model)
        net = net.to(DTYPES[dtype])
    else:
        net, tokenizer = load_model(model, dtype=dtype), model
    if tokenizer is None:
        raise ValueError(f"--model: '{model}' records no tokenizer; evaluate its exported HF directory instead")
    return net.to(device), load_tokenizer(tokenizer)


def run(model: str, tasks: str = "just_chop", limit: Optional[int] = None, batch_size: Union[int, str] = "auto",
        output: Optional[str] = None, data_dir: Optional[str] = None, dtype: Optional[str] = None,
        device: Optional[str] = None, samples: bool = False) -> dict:
    """Evaluate ``model`` on ``tasks``, print lm-eval's table, write JSON to ``output`` (never over a file).

    Args:
        model: a Hugging Face directory, a hub id, or a chop Lightning checkpoint (.ckpt).
        tasks: comma-separated task names, or the groups just_chop and suite.
        limit: the first N documents of each task (MMLU: of each subject).
        batch_size: sequences per batch for the longest requests, or auto.
        output: a JSON file for the results (must not exist).
        data_dir: read each task from DIR/<task>/ (jsonl/json/parquet files or a save_to_disk folder).
        dtype: float32, bfloat16 or float16 (default: bfloat16 on GPU, float32 on CPU).
        device: cuda or cpu (default: cuda when there is one).
        samples: also write each document's log-likelihoods to the JSON.
    """
    from chop.eval.tasks import get

    get(tasks)  # an unknown task fails here, before any model loads
    if output and Path(output).exists():
        raise FileExistsError(f"--output: '{output}' exists; choose another file")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    start = time.perf_counter()
    net, tokenizer = load(model, dtype, device)
    results = evaluate(net, tokenizer, tasks, limit=limit, batch_size=batch_size, data_dir=data_dir)
    seconds = time.perf_counter() - start
    print(table(results))
    print(f"{model}: {seconds:.1f} s end to end")
    out = {"model": model, "tasks": tasks, "limit": limit, "dtype": dtype, "device": device, "seconds": seconds,
           **to_json(results, samples)}
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(out, indent=2))
    return out


def main(args: Optional[list[str]] = None) -> None:
    parser = ArgumentParser(prog="chop eval", description=run.__doc__)
    parser.add_function_arguments(run)
    cfg = parser.parse_args(args)
    run(**cfg.as_dict())
