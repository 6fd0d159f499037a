"""Model FLOPs per token, for MFU and compute budgets."""

from __future__ import annotations

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


def train_flops_per_token(model: nn.Module, seq_len: int) -> float:
    """6N + 12 L d s: forward and backward of every parameter, plus attention scores and values (PaLM appendix B).

    N counts all parameters (tied embeddings once), as the reference MFU figures in the issues do.
    """
    config = model.config.get_text_config()
    n = sum(p.numel() for p in model.parameters())
    return 6 * n + 12 * config.num_hidden_layers * config.hidden_size * seq_len
