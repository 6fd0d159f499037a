"""Which single weights to remove, given a score per weight: one threshold over all layers, the lowest share of each
output row, or the lowest n of every m consecutive weights of a row (n:m, e.g. 2:4)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def global_threshold(costs: Sequence[torch.Tensor], fraction: float) -> float:
    """The cost below which ``fraction`` of all entries lie (one threshold across layers)."""
    flat = torch.cat([c.flatten().double().cpu() for c in costs])  # the costs' own precision: no ties from rounding
    k = int(round(fraction * len(flat)))
    if k <= 0:
        return -math.inf
    return float(flat.kthvalue(min(k, len(flat))).values)


def row_mask(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """True for the ``fraction`` lowest-scoring weights of each output row (Wanda's comparison group)."""
    k = int(round(fraction * scores.shape[1]))
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        mask.scatter_(1, scores.topk(k, dim=1, largest=False).indices, True)
    return mask


def nm_costs(costs: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each group of ``m`` consecutive weights of a row: the sum of its ``n`` smallest costs, and the mask of
    those ``n`` (True = remove)."""
    rows, cols = costs.shape
    if cols % m:
        raise ValueError(f"pruning.m: a linear has {cols} inputs, not a multiple of {m}")
    groups = costs.view(rows, cols // m, m)
    smallest = groups.topk(n, dim=-1, largest=False)
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, smallest.indices, True)
    return smallest.values.sum(-1), mask.view(rows, cols)
