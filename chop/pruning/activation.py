"""Activation-based width pruning as Minitron does it (arXiv 2407.14679): MLP units, attention groups and, optionally,
hidden (embedding) channels ranked by the magnitude of their activations on calibration text (the mean over the
sequence, the L2 norm over the batch), the lowest removed; the same widths in every layer, so the result is a standard
config. No weight update: Minitron recovers by distillation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
from torch import nn
from transformers import PreTrainedModel


from chop.models.registry import architecture, decoder_layers
from chop.models.per_layer_widths import slice_linear
from chop.pruning import shots, statistics
from chop.pruning.pruner import Pruner, Report
from chop.pruning.structures import by_layer, linears, prunable_params, structures


@dataclass
class Activation(Pruner):
    """Minitron's activation-based width pruning.

    Args:
        sparsity: the fraction of the decoder linears' parameters to remove, by ``embedding`` first and the rest as
            the same share of each kind in ``units`` (every layer the same widths).
        units: which structures are ranked and removed: MLP units, attention groups (a key/value head with its
            query heads), or both.
        embedding: the fraction of hidden channels to remove (ranked by the norms' outputs, summed over layers).
        align: every layer keeps a multiple of this many MLP units (fast matmuls on GPUs).
        calibration_samples: calibration sequences (Minitron: 1,024).
        seq_len: calibration sequence length (default: the model's context length).
        batch_size: calibration sequences per forward pass.
    """

    method: Literal["activation"] = "activation"
    sparsity: float = 0.3
    units: list[Literal["mlp", "attention"]] = field(default_factory=lambda: ["mlp"])
    embedding: float = 0.0
    align: int = 8
    calibration_samples: int = 128
    seq_len: Optional[int] = None
    batch_size: int = 4

    def check(self, config) -> None:
        super().check(config)
        if not 0 <= self.embedding < self.sparsity:
            raise ValueError(f"pruning.embedding: {self.embedding} must be in [0, sparsity = {self.sparsity}): the "
                             f"share of hidden channels removed, which removes about that share of the parameters")
        if self.embedding and config.model_type not in HIDDEN_SLICEABLE:
            raise ValueError(f"pruning.embedding: chop slices the hidden channels of {list(HIDDEN_SLICEABLE)} only, not "
                             f"'{config.model_type}' (scaled or positional embeddings); set it to 0")
        if not self.units and self.sparsity > self.embedding:
            raise ValueError("pruning.units: name mlp and/or attention (the rest of the sparsity is taken from them)")

    def prune(self, model, batches, evaluate=None, on_shot=None) -> Report:
        return shots.run(model, self, lambda state, target, t: self.shot(state, target, batches), evaluate, on_shot)

    def shot(self, state: shots.State, target: float, batches) -> dict:
        model = state.model
        arch = architecture(model.config)
        prefix = arch.layers
        blocks = range(len(decoder_layers(model)))
        outs = {f"{prefix}.{i}.{n}": model.get_submodule(f"{prefix}.{i}.{n}")
                for i in blocks for n in (arch.mlp_out, arch.attention[3])}
        norms = {name: m for name, m in model.named_modules()
                 if "Norm" in type(m).__name__ and getattr(m, "weight", None) is not None
                 and m.weight.shape == (model.config.get_text_config().hidden_size,)}
        stats = statistics.gather(model, outs, batches, statistics.mean_magnitude_squares)
        if self.embedding:
            by_norm = statistics.gather(model, norms, batches, statistics.mean_magnitude_squares, of="output")
            channels = sum(s.sqrt() for s in by_norm.values())
            hidden = len(channels)
            keep = sorted(channels.argsort(descending=True)[:hidden - round(self.embedding * hidden)].tolist())
            before = prunable_params(state.layers)
            slice_hidden(model, keep)
            state.layers = linears(model)
            state.sliced += before - prunable_params(state.layers)
            state.groups = structures(model)  # the same units, with fewer parameters each
        score = []  # per structure: its channels' scores summed (a group's query channels at the output projection)
        for s in state.groups:
            out = next(p for p in s.parts if p.axis == 1)
            score.append(float(stats[out.name][out.index].sqrt().sum()))
        # The coarse kind first (few attention groups per layer round far from any share); the MLP takes what is left.
        shares = {}
        for kind in sorted(self.units, key=["attention", "mlp"].index):
            left = [kd for kd in self.units if kd not in shares]
            size = sum(s.params for s in state.groups if s.kind in left and not s.removed)
            share = shares[kind] = min(1.0, max(0.0, (target * state.total - state.removed()) / max(1, size)))
            for units in by_layer(state.groups, kind).values():
                width = len(units)
                kept = max(1, round((1 - share) * width))
                if kind == "mlp" and self.align > 1:
                    kept = max(self.align, round(kept / self.align) * self.align) if width >= self.align else width
                for k in sorted(units, key=score.__getitem__)[:width - kept]:
                    state.groups[k].removed = True
        shots.zero_removed(state)
        return {"removed_share": shares}


# Architectures whose hidden width is read only by their embeddings, head, norms and block linears (no scaled or
# positional embeddings, no norms inside attention of the hidden width): those whose hidden channels can be sliced.
HIDDEN_SLICEABLE = ("llama", "mistral", "qwen2", "qwen3")


def slice_hidden(model: PreTrainedModel, keep: list[int]) -> None:
    """Keep only hidden channels ``keep``: the embeddings' and LM head's columns, the norms' weights, the columns of
    every block linear that reads the residual stream and the rows of those that write it; the config's
    ``hidden_size`` follows (``head_dim`` made explicit)."""
    config = model.config.get_text_config()
    if config.model_type not in HIDDEN_SLICEABLE:
        raise ValueError(f"hidden channels of '{config.model_type}' cannot be sliced (only {HIDDEN_SLICEABLE})")
    arch = architecture(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    idx = torch.tensor(keep, dtype=torch.long)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    emb = model.get_input_embeddings()
    emb.weight = nn.Parameter(emb.weight.detach().index_select(1, idx.to(emb.weight.device)))
    emb.embedding_dim = len(keep)
    for i, block in enumerate(decoder_layers(model)):
        prefix = f"{arch.layers}.{i}."
        for name in (*arch.attention[:3], *arch.mlp_in):
            slice_linear(model, prefix + name, 1, keep)
        for name in (arch.attention[3], arch.mlp_out):
            slice_linear(model, prefix + name, 0, keep)
    norms = [m for block in decoder_layers(model) for m in block.children() if "Norm" in type(m).__name__]
    norms.append(model.base_model.norm)
    for norm in norms:
        norm.weight = nn.Parameter(norm.weight.detach().index_select(0, idx.to(norm.weight.device)))
    head = model.get_output_embeddings()
    if tied:
        head.weight = emb.weight
    else:
        slice_linear(model, _name_of(model, head), 1, keep)
    config.head_dim, config.hidden_size = head_dim, len(keep)


def _name_of(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)
