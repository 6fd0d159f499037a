"""The magnitude baseline: costs ½W² (K-OBD's costs under an identity curvature), no calibration text, no updates."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from chop.pruning import kfac, shots
from chop.pruning.surgeon import Sparsity


@dataclass
class Magnitude(Sparsity):
    """Remove the structures, n:m blocks or weights of least squared magnitude (one shot: without updates, more shots
    choose the same)."""

    method: Literal["magnitude"] = "magnitude"

    def curvature(self, state: shots.State, batches: Sequence[torch.Tensor]) -> Iterator[dict[str, kfac.Factors]]:
        ones = lambda n, layer: torch.ones(n, dtype=torch.float64, device=layer.weight.device)  # noqa: E731
        yield {name: kfac.Factors(*(ones(n, layer) for n in kfac.factor_sizes(layer)))
               for name, layer in state.layers.items()}
