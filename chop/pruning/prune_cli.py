"""``python -m chop prune --config CONFIG``: a pruning method (LLM Surgeon, K-OBD, magnitude, Wanda, Minitron's
activation ranking: ``pruning.method``) on a model, written as a Hugging Face directory plus ``pruning.json`` (what was
removed, per shot and per layer) and TensorBoard events (held-out perplexity and sparsity per shot, sparsity by layer
and matrix type).

On several GPUs: ``torchrun --nproc_per_node N -m chop prune --config CONFIG``. Each rank gathers curvature and
held-out perplexity on its share of the batches; all keep rank 0's removals, and rank 0 writes the result.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Optional, get_args

import torch
from jsonargparse import ActionConfigFile, ArgumentParser

from chop.models.perplexity import token_perplexity
from chop.pruning import ranks
from chop.pruning.layerchop import LayerChop
from chop.pruning.pruner import Report
from chop.pruning.registry import Pruning
from chop.pruning.student import build_student

log = logging.getLogger(__name__)

MatmulPrecision = Literal["highest", "high"]


@contextmanager
def float32_matmul_precision(precision: str) -> Iterator[None]:
    """PyTorch's float32 matrix-product precision set to ``precision`` for the duration, then put back."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


@dataclass
class Text:
    """A text source: a hub dataset (``path``, ``name``, ``split``) or local ``files``; offline, chop's
    english-passages (``train`` for calibration, ``val`` for held-out). ``join``: the rows joined by this string into
    one text before tokenising (WikiText's perplexity protocol, GPTQ's and LLM Surgeon's: ``"\n\n"``); unset: each
    row a document, EOS between them."""

    path: Optional[str] = "Salesforce/wikitext"
    name: Optional[str] = "wikitext-2-raw-v1"
    split: str = "train"
    files: Optional[list[str]] = None
    text_field: str = "text"
    join: Optional[str] = None

    def texts(self, offline_split: str) -> Iterator[str]:
        rows = self._rows(offline_split)
        if self.join is None:
            yield from rows
        else:
            yield self.join.join(rows)

    def _rows(self, offline_split: str) -> Iterator[str]:
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
    """Token perplexity of the held-out blocks, each rank scoring its share."""
    device = next(model.parameters()).device
    sums = torch.zeros(2, dtype=torch.float64)  # summed loss, tokens
    for i in ranks.my_share(range(0, len(held_out), batch_size)):
        ids = torch.stack(held_out[i:i + batch_size]).to(device)
        logits = model(input_ids=ids[:, :-1], use_cache=False).logits.float()
        sums[0] += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum"))
        sums[1] += ids[:, 1:].numel()
    ranks.sum_over_ranks([sums])
    return token_perplexity(float(sums[0]), int(sums[1]))


def run(model: str, out: str, pruning: Optional[Pruning] = None, chop: Optional[LayerChop] = None,
        calibration: Text = Text(), held_out: Text = Text(split="test", join="\n\n"), held_out_blocks: int = 16,
        held_out_len: Optional[int] = None, dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        matmul_precision: MatmulPrecision = "highest", device: Optional[str] = None,
        tokenizer: Optional[str] = None, seed: int = 0) -> Optional[Report]:
    """Chop and/or prune ``model`` (``build_student``: layers first, then the pruner) and write it to ``out``.

    Args:
        model: hub id or directory of the model to prune.
        out: a new (or empty) directory for the pruned model, its tokenizer and pruning.json.
        pruning: the method (``method``: surgeon, obd, magnitude, wanda, activation; without one, surgeon) and its
            own settings; unset: chop layers only.
        chop: decoder layers to remove before pruning (as ``chop fit``'s ``model.chop``).
        calibration: text the method's statistics are gathered on (default: wikitext-2 train, as LLM Surgeon).
        held_out: text whose perplexity is logged after every shot (default: wikitext-2 test, its rows joined by
            blank lines as the standard WikiText-2 perplexity protocol does).
        held_out_blocks: sequences in the held-out set (0: no held-out perplexity).
        held_out_len: tokens per held-out sequence (default: the pruner's ``seq_len``, else the model's context);
            give it to compare methods on the same blocks.
        dtype: the model's dtype while pruning (curvature and updates are float64 regardless).
        matmul_precision: float32 matrix products (PyTorch's ``set_float32_matmul_precision``): highest, in float32;
            high, on a GPU's TF32 tensor cores (inputs rounded to 10 mantissa bits, float32 sums; several times
            faster from Ampere on) for the whole run: forward, backward, K-FAC's moments and the held-out
            perplexities. The factors' inverses and the updates stay float64. A bf16 or float16 model is unaffected.
        device: cuda or cpu (default: cuda when there is one; under torchrun, each rank's own GPU).
        tokenizer: when it differs from ``model``.
        seed: for sampled Fisher labels.
    """
    if matmul_precision not in get_args(MatmulPrecision):
        raise ValueError(f"--matmul_precision: '{matmul_precision}' is not one of {list(get_args(MatmulPrecision))}")
    with float32_matmul_precision(matmul_precision):
        from chop.models.checkpoint import save_model
        from chop.models.loading import load_config, load_model, load_tokenizer

        folder = Path(out)
        if folder.exists() and any(folder.iterdir()):
            raise FileExistsError(f"--out: '{out}' exists and is not empty; choose another directory")
        if pruning is None and chop is None:
            raise ValueError("--pruning/--chop: give a pruning method, layers to chop, or both")
        config = load_config(model)
        if pruning is not None:
            pruning.check(config)  # bad settings or an unknown architecture: before any weights or data load
        if chop is not None:
            chop.n_to_remove(config.get_text_config().num_hidden_layers)
        tok = load_tokenizer(tokenizer or model)
        seq = ((pruning and pruning.seq_len) or getattr(config.get_text_config(), "max_position_embeddings", None)
               or 2048)
        batch = pruning.batch_size if pruning is not None else 4
        wanted = max(pruning.calibration_samples if pruning is not None else 0,
                     chop.calibration_batches * batch if chop is not None and chop.needs_calibration else 0)
        calib = blocks(calibration, tok, seq + 1, wanted, "train", "pruning.calibration_samples") if wanted else []
        test = blocks(held_out, tok, (held_out_len or seq) + 1, held_out_blocks, "val", "held_out_blocks") \
            if held_out_blocks else []
        data = Batches([torch.stack(calib[i:i + batch]) for i in range(0, len(calib), batch)])
        torch.manual_seed(seed)
        device = _join_ranks(device)
        first = ranks.rank_and_world()[0] == 0  # rank 0 writes; under torchrun the others only compute
        if first:
            folder.mkdir(parents=True, exist_ok=True)
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(folder / "tensorboard")) if first else None
        dense: list[Optional[float]] = [None]

        def load() -> Any:
            net = load_model(model, dtype=dtype).to(device)
            dense[0] = perplexity(net, test) if test else None
            if dense[0] is not None and first:
                writer.add_scalar("pruning/ppl", dense[0], 0)
                log.info("dense held-out perplexity %.3f", dense[0])
            return net

        def on_shot(shot: int, record: dict) -> None:
            if not first:
                return
            writer.add_scalar("pruning/sparsity", record["sparsity"], shot)
            if "ppl" in record:
                writer.add_scalar("pruning/ppl", record["ppl"], shot)
            if "lora_loss" in record:
                writer.add_scalar("pruning/lora_loss", record["lora_loss"], shot)
            _log_layers(writer, record["layers"], shot)

        student = build_student(load, chop, pruning, data, evaluate=(lambda m: perplexity(m, test)) if test else None,
                                on_shot=on_shot)
        report, net = student.report, student.model
        if not first:
            return report
        after = (perplexity(net, test) if test and report is None
                 else (report.shots[-1].get("ppl") if report else None))
        writer.close()
        save_model(net, folder)
        tok.save_pretrained(folder)
        (folder / "pruning.json").write_text(json.dumps({
            "model": model, "dense_ppl": dense[0], "ppl": after, "settings": asdict(pruning) if pruning else None,
            "chop": student.plan.to_dict() if student.plan else None, **(report.to_dict() if report else {})},
            indent=2))
        what = (f"{report.method} {report.mode}, sparsity {1 - report.params_after / report.params_before:.4f} of "
                f"the decoder linears" if report
                else f"{len(student.plan.kept)} of {student.plan.num_layers_before} layers kept")
        print(f"{model} -> {folder}: {what}; held-out perplexity {dense[0]} -> {after}")
        return report


@dataclass
class Batches:
    """Calibration batches already made (``CalibrationData`` over a list: the first ``n``)."""

    batches: list[torch.Tensor]

    def calibration_batches(self, n: int) -> list[torch.Tensor]:
        return self.batches[:n]


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
    """``run``'s arguments from the command line and config files, typed (a ``Pruner``, ``Text``s)."""
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
