"""Per-channel statistics of a model's activations over calibration batches (no gradients), summed over batches and
data-parallel ranks: the inputs Wanda weighs weights by, the activations Minitron ranks units by."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Optional

import torch
from torch import nn

from chop.models.registry import decoder_layers
from chop.pruning import ranks

# A batch's contribution per channel: [batch, seq, channels] -> [channels].
Statistic = Callable[[torch.Tensor], torch.Tensor]


def squares(x: torch.Tensor) -> torch.Tensor:
    """Σ x² over tokens: the squared L2 norm of each channel over the calibration set (Wanda)."""
    return x.float().pow(2).flatten(0, -2).sum(0)


def mean_magnitude_squares(x: torch.Tensor) -> torch.Tensor:
    """Σ over sequences of (mean over positions of |x|)²: its square root is Minitron's score (mean over the sequence,
    L2 norm over the batch)."""
    return x.float().abs().mean(-2).pow(2).flatten(0, -2).sum(0)


class _Stop(Exception):
    pass


@torch.no_grad()
def gather(model: nn.Module, modules: dict[str, nn.Module], batches: Sequence[torch.Tensor], statistic: Statistic,
           of: str = "input", until_block: Optional[int] = None) -> dict[str, torch.Tensor]:
    """``statistic`` of each module's input (``of="input"``) or output, summed over this rank's share of ``batches``
    and then over ranks. ``until_block``: the forward stops after that decoder block (later blocks are not needed)."""
    sums: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def fn(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0] if of == "input" else output
            x = x[0] if isinstance(x, tuple) else x
            s = statistic(x).double()
            sums[name] = s if name not in sums else sums[name].add_(s)
        return fn

    handles = [m.register_forward_hook(hook(name)) for name, m in modules.items()]
    if until_block is not None:
        def stop(*_):
            raise _Stop
        handles.append(decoder_layers(model)[until_block].register_forward_hook(stop))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for ids in ranks.my_share(list(batches)):
            try:
                model(input_ids=ids[:, :-1].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if ranks.rank_and_world()[1] > 1:  # a rank with no batch adds zeros
        for name, m in modules.items():
            if name not in sums:
                width = m.in_features if of == "input" else m.weight.shape[0]
                sums[name] = torch.zeros(width, dtype=torch.float64, device=device)
        ranks.sum_over_ranks([sums[name] for name in modules])  # the same order on every rank
    return sums
