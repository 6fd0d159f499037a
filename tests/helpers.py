"""Callbacks that tests add to a fit run from the command line (``--trainer.callbacks+=helpers.X``)."""

import hashlib
import json
import os

from lightning.pytorch.callbacks import Callback


class RecordSteps(Callback):
    """Appends one json line per training step: global step, loss, the logged train/* values, a hash of the batch."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        ids = batch["input_ids"].cpu().numpy()
        with open(f"{self.path}.rank{trainer.global_rank}", "a") as f:
            f.write(json.dumps({"step": trainer.global_step, "loss": float(outputs["loss"]),
                                "batch": hashlib.sha1(ids.tobytes()).hexdigest(), "ids": ids.tolist(),
                                "logged": {k: float(v) for k, v in trainer.callback_metrics.items()
                                           if k.startswith("train/")}}) + "\n")


class KillAt(Callback):
    """Ends the process abruptly when step ``step`` is about to run (checkpoints of earlier steps are on disk)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os._exit(3)
