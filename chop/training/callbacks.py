"""Lightning callbacks and plugins: compute accounting, throughput/MFU, compute budgets, atomic checkpoints."""

from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ThroughputMonitor

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


class ComputeAccounting(Callback):
    """A run's cumulative tokens, training FLOPs (the module's ``flops_per_batch``) and device-hours (wall time x
    devices), over all ranks and across resumes: logged as ``train/tokens_seen``, ``train/flops`` and
    ``train/gpu_hours``, saved in every checkpoint as this callback's state. Every chop training module adds one."""

    def __init__(self) -> None:
        self.tokens, self.flops, self.device_seconds = 0, 0.0, 0.0

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._clock = time.perf_counter()

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._batch_tokens = batch["input_ids"][:, :-1].numel()

    def on_after_backward(self, trainer: Any, pl_module: Any) -> None:
        # Counted once the step's compute is spent, inside the step: other callbacks' on_train_batch_end (a checkpoint,
        # a record of the step) see it whatever their order.
        world, now = trainer.world_size, time.perf_counter()
        self.tokens += self._batch_tokens * world
        self.flops += pl_module.flops_per_batch * world
        self.device_seconds += (now - self._clock) * world
        self._clock = now
        pl_module.log_dict({"train/tokens_seen": float(self.tokens), "train/flops": self.flops,
                            "train/gpu_hours": self.device_seconds / 3600})

    def state_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "flops": self.flops, "device_seconds": self.device_seconds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tokens, self.flops, self.device_seconds = state["tokens"], state["flops"], state["device_seconds"]


def accounting(trainer: Any) -> ComputeAccounting:
    """The run's ``ComputeAccounting`` callback."""
    found = [cb for cb in trainer.callbacks if isinstance(cb, ComputeAccounting)]
    if not found:
        raise ValueError("trainer.callbacks: no ComputeAccounting; chop's training modules add it "
                         "(configure_callbacks), a module of another kind must add it to count compute")
    return found[0]


class ComputeBudget(Callback):
    """Ends training once the run's cumulative training FLOPs or tokens (all devices, across resumes) reach a budget.

    The training module turns the budget into ``trainer.max_steps`` before it builds the learning-rate schedule, so
    the schedule ends where the budget does; equal-compute comparisons differ only in this line of their configs.
    Under gradient accumulation it stops only after a whole optimizer step.
    FLOPs are the module's ``flops_per_token`` (a distillation student's 6N plus its teacher's 2N, attention included).
    """

    def __init__(self, max_flops: Optional[float] = None, max_tokens: Optional[int] = None) -> None:
        if max_flops is None and max_tokens is None:
            raise ValueError("ComputeBudget: set max_flops or max_tokens (or both)")
        if (max_flops is not None and max_flops <= 0) or (max_tokens is not None and max_tokens <= 0):
            raise ValueError(f"ComputeBudget: max_flops ({max_flops}) and max_tokens ({max_tokens}) must be > 0")
        self.max_flops, self.max_tokens = max_flops, max_tokens

    def max_steps(self, trainer: Any, pl_module: Any) -> int:
        """Optimizer steps that reach the budget, from the data's batch shape and the module's FLOPs per token."""
        hparams = getattr(trainer.datamodule, "hparams", {})
        seq, batch = hparams.get("seq_len"), hparams.get("batch_size")
        if not seq or not batch:
            raise ValueError("ComputeBudget: the data module's hparams need seq_len and batch_size to turn a budget "
                             "into steps (chop.StreamingDataModule has both)")
        tokens = batch * seq * trainer.world_size * trainer.accumulate_grad_batches
        limits = []
        if self.max_tokens is not None:
            limits.append(math.ceil(self.max_tokens / tokens))
        if self.max_flops is not None:
            limits.append(math.ceil(self.max_flops / (tokens * pl_module.flops_per_token(seq))))
        return min(limits)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        if trainer.fit_loop.epoch_loop._should_accumulate():
            return  # stop only where an optimizer step has just been taken, as the schedule does
        spent = accounting(trainer)
        if (self.max_tokens is not None and spent.tokens >= self.max_tokens) or \
                (self.max_flops is not None and spent.flops >= self.max_flops):
            trainer.should_stop = True


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file in the same folder, fsyncs it, then renames it into place; reads
    them as data only (``weights_only=True``), refusing a file that would need pickled code.

    A crash while saving leaves the previous file (e.g. ``last.ckpt``) whole, and a stale temporary file of an
    earlier killed save is removed by the next save into that folder.
    """

    def load_checkpoint(self, path: Any, map_location: Optional[Any] = None,
                        weights_only: Optional[bool] = None) -> dict[str, Any]:
        from chop.models.checkpoint import load_checkpoint

        return load_checkpoint(path)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(".*.ckpt.*.tmp"):  # left by a save that was killed
            stale.unlink(missing_ok=True)
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
