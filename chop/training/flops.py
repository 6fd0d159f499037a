"""Model FLOPs per token, for MFU and compute budgets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

# Dense bf16 tensor-core peaks (datasheet, TFLOP/s), matched against torch.cuda.get_device_name().
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def peak_tflops(device: Optional[torch.device] = None) -> Optional[float]:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


@dataclass(frozen=True)
class ModelSize:
    """What FLOP counts need of a model. Taken before a strategy shards the parameters (FSDP would count shards).

    ``params`` counts all parameters (tied embeddings once), as the reference MFU figures in the issues do.
    """

    params: int
    layers: int
    hidden: int

    @classmethod
    def of(cls, model: nn.Module) -> "ModelSize":
        config = model.config.get_text_config()
        return cls(sum(p.numel() for p in model.parameters()), config.num_hidden_layers, config.hidden_size)

    def forward_flops(self, seq_len: int) -> float:
        """Per token, 2N + 4 L d s: a multiply-add per parameter, plus attention scores and values (PaLM app. B)."""
        return 2 * self.params + 4 * self.layers * self.hidden * seq_len

    def train_flops(self, seq_len: int) -> float:
        """Per token, 6N + 12 L d s: the forward, and a backward that costs twice as much."""
        return 3 * self.forward_flops(seq_len)
