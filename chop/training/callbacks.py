"""Lightning callbacks and plugins that chop configs name: throughput/MFU and atomic checkpoint writes."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ThroughputMonitor

from chop.training.flops import peak_tflops


class TokenThroughput(ThroughputMonitor):
    """Tokens/s and model FLOPs utilisation (from the module's ``flops_per_batch``) in TensorBoard.

    ``peak_tflops`` overrides the device's peak (known: H100/H200 989, A100 312, bf16 dense).
    """

    def __init__(self, peak_tflops: Optional[float] = None, window_size: int = 20) -> None:
        super().__init__(batch_size_fn=lambda b: b["input_ids"].shape[0],
                         length_fn=lambda b: b["input_ids"].shape[0] * (b["input_ids"].shape[1] - 1),
                         window_size=window_size)
        self.peak = peak_tflops

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        peak = self.peak or peak_tflops(trainer.strategy.root_device)
        if peak:
            self.available_flops = peak * 1e12
            for t in self._throughputs.values():
                t.available_flops = self.available_flops


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file in the same folder, fsyncs it, then renames it into place.

    A crash while saving leaves the previous file (e.g. ``last.ckpt``) whole.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
