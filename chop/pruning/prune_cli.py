"""``python -m chop prune --config CONFIG``: LLM Surgeon on a model, written as a Hugging Face directory plus
``surgeon.json`` (what was removed, per shot and per layer) and TensorBoard events (held-out perplexity and sparsity
per shot, sparsity by layer and matrix type).

On several GPUs: ``torchrun --nproc_per_node N -m chop prune --config CONFIG``. Each rank gathers curvature and
held-out perplexity on its share of the batches; all keep rank 0's removals, and rank 0 writes the result.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from jsonargparse import ActionConfigFile, ArgumentParser

from chop.pruning import ranks
from chop.pruning.surgeon import Report, Surgeon, prune

log = logging.getLogger(__name__)


@dataclass
class Text:
    """A text source: a hub dataset (``path``, ``name``, ``split``) or local ``files``; offline, chop's
    english-passages (``train`` for calibration, ``val`` for held-out)."""

    path: Optional[str] = "Salesforce/wikitext"
    name: Optional[str] = "wikitext-2-raw-v1"
    split: str = "train"
    files: Optional[list[str]] = None
    text_field: str = "text"

    def texts(self, offline_split: str) -> Iterator[str]:
        from chop import assets
        from chop.data.text import Source, started

        if self.files:
            yield from Source(files=tuple(self.files), text_field=self.text_field).documents()
            return

        def on_hub() -> Iterator[str]:
            hub = Source(path=self.path, name=self.name, split=self.split, text_field=self.text_field)
            return started(hub.documents())

        def passages() -> Iterator[str]:
            path = assets.english_passages() / f"{offline_split}.jsonl"
            return (t for t in Source(files=(str(path),)).documents() if t.strip())

        yield from assets.hub_or_offline(f"{self.path} ({self.name}, {self.split}; offline: english-passages)",
                                         on_hub, passages, "")


def blocks(source: Text, tokenizer: Any, length: int, n: int, offline_split: str, what: str) -> list[torch.Tensor]:
    from chop.data.text import pack_blocks

    out = pack_blocks(source.texts(offline_split), tokenizer, length, n)
    if len(out) < n:
        raise ValueError(f"{what}: the data holds only {len(out)} sequences of {length - 1} tokens, fewer than the "
                         f"{n} requested; lower it (or the sequence length) or give more text")
    return out


@torch.no_grad()
def perplexity(model: Any, held_out: list[torch.Tensor], batch_size: int = 4) -> float:
    """Token perplexity of the held-out blocks."""
    device = next(model.parameters()).device
    sums = torch.zeros(2, dtype=torch.float64)  # summed loss, tokens
    for i in ranks.my_share(range(0, len(held_out), batch_size)):
        ids = torch.stack(held_out[i:i + batch_size]).to(device)
        logits = model(input_ids=ids[:, :-1], use_cache=False).logits.float()
        sums[0] += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum"))
        sums[1] += ids[:, 1:].numel()
    ranks.sum_over_ranks([sums])
    return math.exp(float(sums[0] / sums[1]))


def run(model: str, out: str, surgeon: Surgeon = Surgeon(), calibration: Text = Text(),
        held_out: Text = Text(split="test"), held_out_blocks: int = 16, dtype: str = "float32",
        device: Optional[str] = None, tokenizer: Optional[str] = None, seed: int = 0) -> Report:
    """Prune ``model`` with LLM Surgeon and write it to ``out``.

    Args:
        model: hub id or directory of the model to prune.
        out: a new (or empty) directory for the pruned model, its tokenizer and surgeon.json.
        surgeon: the method's settings (mode, sparsity, shots, damping, ...).
        calibration: text the curvature is estimated on (default: wikitext-2 train, as the paper).
        held_out: text whose perplexity is logged after every shot (default: wikitext-2 test).
        held_out_blocks: sequences of the calibration length in the held-out set (0: no held-out perplexity).
        dtype: the model's dtype while pruning (curvature and updates are float64 regardless).
        device: cuda or cpu (default: cuda when there is one; under torchrun, each rank's own GPU).
        tokenizer: when it differs from ``model``.
        seed: for sampled Fisher labels.
    """
    from chop.models.loading import load_config, load_model, load_tokenizer

    folder = Path(out)
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"--out: '{out}' exists and is not empty; choose another directory")
    config = load_config(model)
    surgeon.check(config)  # bad settings or an unknown architecture: before any weights or data load
    tok = load_tokenizer(tokenizer or model)
    seq = surgeon.seq_len or getattr(config.get_text_config(), "max_position_embeddings", None) or 2048
    calib = blocks(calibration, tok, seq + 1, surgeon.calibration_samples, "train", "surgeon.calibration_samples")
    test = blocks(held_out, tok, seq + 1, held_out_blocks, "val", "held_out_blocks") if held_out_blocks else []
    batches = [torch.stack(calib[i:i + surgeon.batch_size]) for i in range(0, len(calib), surgeon.batch_size)]
    torch.manual_seed(seed)
    device = _join_ranks(device)
    net = load_model(model, dtype=dtype).to(device)
    first = ranks.rank_and_world()[0] == 0  # rank 0 writes; under torchrun the others only compute
    if first:
        folder.mkdir(parents=True, exist_ok=True)
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(folder / "tensorboard")) if first else None
    dense = perplexity(net, test) if test else None
    if dense is not None and first:
        writer.add_scalar("surgeon/ppl", dense, 0)
        log.info("dense held-out perplexity %.3f", dense)

    def on_shot(shot: int, record: dict) -> None:
        if not first:
            return
        writer.add_scalar("surgeon/sparsity", record["sparsity"], shot)
        if "ppl" in record:
            writer.add_scalar("surgeon/ppl", record["ppl"], shot)
        if "lora_loss" in record:
            writer.add_scalar("surgeon/lora_loss", record["lora_loss"], shot)
        _log_layers(writer, record["layers"], shot)

    report = prune(net, surgeon, batches, evaluate=(lambda m: perplexity(m, test)) if test else None, on_shot=on_shot)
    if not first:
        return report
    writer.close()
    net.save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / "surgeon.json").write_text(json.dumps({"model": model, "dense_ppl": dense, "settings": vars(surgeon),
                                                     **report.to_dict()}, indent=2))
    print(f"{model} -> {folder}: {report.mode}, sparsity {1 - report.params_after / report.params_before:.4f} of the "
          f"decoder linears; held-out perplexity {dense} -> {report.shots[-1].get('ppl')}")
    return report


def _join_ranks(device: Optional[str]) -> str:
    """The device to prune on; under torchrun (``WORLD_SIZE`` > 1), join the other ranks first: NCCL on each
    rank's GPU, or gloo on CPU."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and device != "cpu"
    if world > 1 and not torch.distributed.is_initialized():
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    if world > 1 and cuda:
        return f"cuda:{torch.cuda.current_device()}"
    return device or ("cuda" if cuda else "cpu")


def _log_layers(writer: Any, layers: dict[str, float], shot: int) -> None:
    """Sparsity by layer and matrix type after ``shot``: a figure (when matplotlib is installed) and, per matrix
    type, the mean over layers as a scalar."""
    by_type: dict[str, list[tuple[int, float]]] = {}
    for name, sparsity in layers.items():
        parts = name.split(".")
        layer = next(int(p) for p in parts if p.isdigit())
        by_type.setdefault(parts[-1], []).append((layer, sparsity))
    for kind, points in by_type.items():
        writer.add_scalar(f"sparsity/{kind}", sum(p[1] for p in points) / len(points), shot)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for kind, points in sorted(by_type.items()):
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=kind, markersize=3)
    ax.set_xlabel("layer")
    ax.set_ylabel("sparsity")
    ax.set_title(f"shot {shot}", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    writer.add_figure("sparsity_by_layer", fig, shot)


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="chop prune", description=run.__doc__)
    p.add_argument("--config", action=ActionConfigFile)
    p.add_function_arguments(run)
    return p


def parse(args: Optional[list[str]] = None) -> dict:
    """``run``'s arguments from the command line and config files, typed (a ``Surgeon``, ``Text``s)."""
    p = parser()
    cfg = p.parse_args(args)
    cfg.pop("config", None)
    return p.instantiate_classes(cfg).as_dict()


def main(args: Optional[list[str]] = None) -> None:
    logging.basicConfig(level=logging.INFO)
    try:
        run(**parse(args))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
