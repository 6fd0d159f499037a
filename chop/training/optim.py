"""Optimizers and the learning-rate schedule shared by every training module."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn


@dataclass
class Optim:
    """AdamW (or Lion) with decay/no-decay groups, linear warmup, cosine decay to ``min_lr_ratio`` x peak.

    Defaults follow Just CHOP: betas (0.9, 0.95), weight decay 0.1, 2000 warmup steps, cosine to 0.1 x peak.
    The schedule ends at ``trainer.max_steps``.
    """

    name: str = "adamw"
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    eps: float = 1e-8
    warmup_steps: int = 2000
    min_lr_ratio: float = 0.1

    def __post_init__(self) -> None:
        if self.name not in ("adamw", "lion"):
            raise ValueError(f"model.optim.name: '{self.name}' is not one of ['adamw', 'lion']")
        if self.lr <= 0 or self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("model.optim: lr must be > 0, warmup_steps >= 0, min_lr_ratio in [0, 1]")


def param_groups(model: nn.Module, weight_decay: float, matrices: Optional[set[str]] = None) -> list[dict]:
    """Weight decay on matrices only: norms' scales and biases (1-D parameters) get none.

    ``matrices``: the names of the matrices, noted before a strategy flattened them (FSDP shards every parameter
    into a 1-D piece); default: the parameters that are 2-D now.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            name = name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")
            (decay if (name in matrices if matrices is not None else p.ndim >= 2) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak learning rate at ``step``."""
    if step < warmup:
        return (step + 1) / warmup
    if total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / (total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023): sign of an interpolated momentum, decoupled weight decay."""

    def __init__(self, params: Iterable, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                m = state["exp_avg"]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(torch.sign(m * b1 + p.grad * (1 - b1)), alpha=-group["lr"])
                m.mul_(b2).add_(p.grad, alpha=1 - b2)
        return loss


def build(model: nn.Module, cfg: Optim, total_steps: int, matrices: Optional[set[str]] = None) -> dict:
    """Optimizer and per-step scheduler in the form ``LightningModule.configure_optimizers`` returns."""
    groups = param_groups(model, cfg.weight_decay, matrices)
    if cfg.name == "lion":
        opt: torch.optim.Optimizer = Lion(groups, lr=cfg.lr, betas=cfg.betas)
    else:
        fused = all(p.is_cuda for g in groups for p in g["params"])
        opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused or None)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, cfg.warmup_steps, total_steps, cfg.min_lr_ratio)
    )
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
