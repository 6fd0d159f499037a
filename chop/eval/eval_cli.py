"""``python -m chop eval``: the zero-shot suite on a Hugging Face directory, a hub id or a chop checkpoint."""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

import torch
from jsonargparse import ArgumentParser
from transformers import PreTrainedModel

from chop.eval.engine import Encoder, Scorer, token_cache
from chop.eval.suite import evaluate, no_gc, scored_pairs, table, to_json
from chop.eval.tasks import get, load_docs
from chop.models.kernels import (Kernels, apply_kernels, check_device, check_installed, check_kernels, compile_ahead,
                                 hash_triton)


class Clock:
    """Seconds since it was made, and of each named phase (loading the model runs beside reading and tokenising;
    GPU work that a phase leaves queued counts in the next one that waits for it)."""

    def __init__(self) -> None:
        self.start, self.phases = time.perf_counter(), {}

    def time(self, name: str, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        self.phases[name] = time.perf_counter() - t0
        return out

    def total(self) -> float:
        return time.perf_counter() - self.start

    def __str__(self) -> str:
        return ", ".join(f"{k} {v:.1f} s" for k, v in self.phases.items())


def since_process_start() -> Optional[float]:
    """Seconds since this process started (Linux's /proc; None elsewhere): its start-up and imports, which happen
    before any clock of chop's can run."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22: start time
        return float(Path("/proc/uptime").read_text().split()[0]) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def tokenizer_name(model: str) -> str:
    """The tokenizer of an HF directory or hub id (itself), or the one a ``.ckpt`` records (refused if none)."""
    name = model
    if model.endswith(".ckpt"):
        from chop.models.checkpoint import read_checkpoint_meta

        name = read_checkpoint_meta(model, "--model").get("tokenizer")
    if name is None:
        raise ValueError(f"--model: '{model}' records no tokenizer; evaluate its exported HF directory instead")
    return name


def load(model: str, dtype: str, device: str, kernels: Kernels = "torch") -> PreTrainedModel:
    """The model of an HF directory, a hub id (offline copies as everywhere in chop) or a ``.ckpt``, on ``device``,
    with ``kernels`` (liger's compiled in threads first, ``compile_ahead``); on a GPU after one small forward, which
    sets up CUDA, cuBLAS and the attention kernels (seconds, the first time)."""
    from chop.models.loading import DTYPES, load_config, load_model

    if model.endswith(".ckpt"):
        from chop.models.checkpoint import model_from_checkpoint

        net = model_from_checkpoint(model, "--model")[0].to(DTYPES[dtype])
        check_kernels(kernels, net.config, "--kernels")  # a checkpoint's model type is known once it is read
    else:
        if kernels != "torch":  # the config read only where there is something to check, before the weights load
            check_kernels(kernels, load_config(model), "--kernels")
        net = load_model(model, dtype=dtype)
    net = net.to(device).eval()
    apply_kernels(net, kernels)
    if kernels != "torch":
        compile_ahead(net)
    if net.device.type == "cuda":
        with torch.inference_mode():
            net(input_ids=torch.zeros(8, 128, dtype=torch.long, device=net.device), use_cache=False)
    return net


def check_output(output: str) -> None:
    """Make ``output``'s folder now, and refuse a file that exists or cannot be written, before any scoring."""
    path = Path(output)
    if path.exists():
        raise FileExistsError(f"--output: '{output}' exists; choose another file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"--output: cannot make the folder of '{output}' ({err.strerror}: a part of the path is a "
                         f"file, or not writable); choose another file") from err
    if not os.access(path.parent, os.W_OK):
        raise PermissionError(f"--output: the folder '{path.parent}' is not writable; choose another file")


def check_kernels_for(kernels: str, mode: str, device: str) -> None:
    """Refuse, before anything loads, fused kernels in exact mode (they change the bits), off a CUDA GPU, or without
    liger-kernel. Whether it has kernels for the model's type is asked as the model loads (``load``): that imports
    liger-kernel, seconds that there run beside the reading and tokenising of the documents, not before them."""
    if kernels == "torch":
        return
    if mode != "fast":
        raise ValueError(f"--kernels: '{kernels}' changes the arithmetic, and --mode exact keeps lm-eval's numbers bit "
                         f"for bit; use --mode fast with it, or leave --kernels torch")
    check_device(kernels, torch.device(device), "--kernels")
    check_installed(kernels, "--kernels")


def run(model: str, tasks: str = "just_chop", limit: Optional[int] = None, batch_size: Union[int, str] = "auto",
        output: Optional[str] = None, data_dir: Optional[str] = None,
        dtype: Optional[Literal["float32", "bfloat16", "float16", "bf16-mixed"]] = None,
        device: Optional[str] = None, samples: bool = False, mode: Literal["exact", "fast"] = "exact",
        kernels: Kernels = "torch") -> dict:
    """Evaluate ``model`` on ``tasks``, print lm-eval's table, write JSON to ``output`` (never over a file).

    Args:
        model: a Hugging Face directory, a hub id, or a chop Lightning checkpoint (.ckpt).
        tasks: comma-separated task names, or the groups just_chop and suite.
        limit: the first N documents of each task (MMLU: of each subject).
        batch_size: rows per batch, as lm-eval's --batch_size (its batches, its numbers on any hardware), or auto
            (rows packed up to a number of tokens; the same numbers where kernels do not depend on the batch: H100).
        output: a JSON file for the results (must not exist).
        data_dir: read each task from DIR/<task>/ (jsonl/json/parquet files or a save_to_disk folder).
        dtype: the weights' dtype (default: bfloat16 on GPU, float32 on CPU), or bf16-mixed: float32 weights under
            bfloat16 autocast, as a run trained with ``precision: bf16-mixed`` scores itself (ZeroShotEvalCallback).
        device: cuda or cpu (default: cuda when there is one).
        samples: also write each document's log-likelihoods to the JSON.
        mode: exact: one row per request, lm-eval's numbers bit for bit in its dtype; fast: the choices of one context
            in one row (the context scored once: half the tokens of a multiple-choice task), numbers equal to
            lm-eval's only to the dtype's rounding (``chop.eval.agreement`` measures how far, against bf16's own).
        kernels: torch (the model's own modules) or, with --mode fast on a GPU, liger: liger-kernel's fused RMSNorm,
            rotary embeddings and SwiGLU (``chop.models.kernels``; fewer passes over memory, other rounding).
    """
    get(tasks)  # an unknown task fails here, before any model loads
    if mode not in ("exact", "fast"):
        raise ValueError(f"--mode: '{mode}' is not one of ['exact', 'fast']")
    if output:
        check_output(output)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    from chop.models.loading import DTYPES, load_tokenizer

    if dtype not in (*DTYPES, "bf16-mixed"):
        raise ValueError(f"--dtype: '{dtype}' is not one of {[*DTYPES, 'bf16-mixed']}")
    check_kernels_for(kernels, mode, device)
    mixed = dtype == "bf16-mixed"
    clock, start_up = Clock(), since_process_start()
    tokenizer_dir, chosen = tokenizer_name(model), get(tasks)
    with no_gc(), ThreadPoolExecutor(2) as pool:  # the model loads while the documents are read and tokenised
        if kernels != "torch":  # and Triton's hash of itself, outside the GIL, before liger's first kernel asks for it
            pool.submit(hash_triton)
        loading = pool.submit(clock.time, "load model", load, model, "float32" if mixed else dtype, device, kernels)
        tokenizer = clock.time("load tokenizer", load_tokenizer, tokenizer_dir)
        # this process forks nothing after it: the tokenizer's threads
        encoder = clock.time("read token cache", Encoder, tokenizer, threads=True, cache_dir=token_cache())
        docs = clock.time("read documents", lambda: {t.name: load_docs(t, data_dir, limit)
                                                     for t in chosen if t.kind != "blocks"})
        clock.time("tokenise", encoder.encode_pairs, scored_pairs(chosen, lambda t: docs[t.name]))
        encoder.save()
        net = loading.result()
        scorer = Scorer(net, tokenizer, batch_size, share_contexts=mode == "fast", encoder=encoder)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=mixed):
            results = clock.time("score", evaluate, net, tokenizer, tasks, limit=limit, data_dir=data_dir,
                                 scorer=scorer, docs=docs)
    seconds = clock.total()
    print(table(results))
    print(f"{model}: {seconds:.1f} s end to end ({clock})")
    out = {"model": model, "tasks": tasks, "limit": limit, "dtype": dtype, "device": device, "mode": mode,
           "kernels": kernels,
           "seconds": seconds, "start_up": start_up,  # process start to the clock: interpreter, imports, arguments
           "phases": clock.phases, **to_json(results, samples), "batch_size_lowered_to": scorer.lowered}
    if output:
        Path(output).write_text(json.dumps(out, indent=2))
    return out


def main(args: Optional[list[str]] = None) -> None:
    parser = ArgumentParser(prog="chop eval", description=run.__doc__)
    parser.add_function_arguments(run)
    cfg = parser.parse_args(args)
    run(**cfg.as_dict())
