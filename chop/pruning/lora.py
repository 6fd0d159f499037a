"""First-order updates between LLM Surgeon's shots: low-rank adapters on the pruned linears, trained by the LM loss
on calibration batches, merged into the weights. Pruned entries take no part: an adapter's delta is masked where
weights were removed (structured: whole rows and columns, by the adapter's factors; elementwise: the full delta),
so they stay exactly zero."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

# Per linear, what stays: (rows kept, columns kept) as 1/0 vectors, or a full 1/0 matrix.
Keep = Union[tuple[torch.Tensor, torch.Tensor], torch.Tensor]


class Adapter(nn.Module):
    """A rank-``rank`` delta B·A on one linear (B starts at zero, so the model starts unchanged)."""

    def __init__(self, layer: nn.Linear, rank: int, keep: Keep) -> None:
        super().__init__()
        device = layer.weight.device
        self.A = nn.Parameter(torch.randn(rank, layer.in_features, device=device) / math.sqrt(layer.in_features))
        self.B = nn.Parameter(torch.zeros(layer.out_features, rank, device=device))
        self.keep = keep

    def delta(self) -> torch.Tensor:
        d = self.B @ self.A
        if isinstance(self.keep, tuple):
            return d * self.keep[0][:, None] * self.keep[1][None, :]
        return d * self.keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if isinstance(self.keep, tuple):  # low rank all the way: no out x in matrix per forward
            rows, cols = self.keep
            return ((x * cols) @ self.A.T @ self.B.T) * rows
        return x @ self.delta().T


def train(model: nn.Module, layers: dict[str, nn.Linear], keep: dict[str, Keep], batches: Sequence[torch.Tensor],
          rank: int, lr: float) -> float:
    """Train adapters on ``layers`` (the model's own weights frozen) over ``batches`` of token ids, one step each,
    merge them, and return the mean LM loss over the pass."""
    adapters = {name: Adapter(layer, rank, keep[name]) for name, layer in layers.items()}
    handles = [layer.register_forward_hook(lambda m, args, out, a=adapters[name]: out + a(args[0]).to(out.dtype))
               for name, layer in layers.items()]
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    opt = torch.optim.AdamW([p for a in adapters.values() for p in a.parameters()], lr=lr, weight_decay=0.0)
    was_training = model.training
    model.eval()  # no dropout: the same deterministic model the curvature saw
    losses = []
    try:
        device = next(model.parameters()).device
        for ids in batches:
            ids = ids.to(device)
            logits = model(input_ids=ids[:, :-1], use_cache=False).logits
            loss = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    finally:
        for h in handles:
            h.remove()
        for p, flag in frozen:
            p.requires_grad_(flag)
        model.train(was_training)
    with torch.no_grad():
        for name, layer in layers.items():
            layer.weight.add_(adapters[name].delta().to(layer.weight.dtype))
    return sum(losses) / max(1, len(losses))
