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


class RecordSharding(Callback):
    """Writes, per rank, how much of the teacher and the student this rank holds once the strategy has set up."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_start(self, trainer, pl_module):
        from torch.distributed.fsdp import FullyShardedDataParallel

        def local(module):
            return sum(p.numel() for p in module.parameters())

        with open(f"{self.path}.rank{trainer.global_rank}", "w") as f:
            json.dump({"teacher_local": local(pl_module.teacher), "student_local": local(pl_module.model),
                       "teacher_units": sum(isinstance(m, FullyShardedDataParallel) for m in pl_module.teacher.modules()),
                       "teacher_dtypes": sorted({str(p.dtype) for p in pl_module.teacher.parameters()}),
                       "teacher_training": any(m.training for m in pl_module.teacher.modules()),
                       "decayed": len(trainer.optimizers[0].param_groups[0]["params"])}, f)


from lightning.pytorch.strategies import FSDPStrategy as _FSDPStrategy


class CPUFSDP(_FSDPStrategy):
    """Lightning's FSDP strategy, allowed on CPU processes (gloo): Lightning refuses ``FSDPStrategy`` itself without
    a GPU, but torch's FSDP runs on CPU, so the sharding and checkpoint logic can be tested where CI runs."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        import lightning.pytorch.strategies.fsdp as strategy

        strategy._get_full_state_dict_context = _full_state_dict_on_cpu

    def _setup_model(self, model):
        import torch
        import torch.distributed.fsdp as fsdp

        real = fsdp.FullyShardedDataParallel

        class OnCPU(real):  # Lightning passes device_id=None on CPU, which FSDP refuses; the units inherit it
            def __init__(self, *args, device_id=None, **kwargs):
                super().__init__(*args, device_id=torch.device("cpu"), **kwargs)

        fsdp.FullyShardedDataParallel = OnCPU
        try:
            return super()._setup_model(model)
        finally:
            fsdp.FullyShardedDataParallel = real


def _full_state_dict_on_cpu(module, world_size, rank0_only=True):
    """Lightning's full state-dict context without ``offload_to_cpu``, which assumes GPU tensors: on CPU, FSDP's
    offload frees the very storage the model's state dict holds (a segfault), and ``.cpu()`` copies nothing, so every
    optimizer state of a parameter (Adam's two moments) would be one view of a reused gather buffer."""
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return FSDP.state_dict_type(module, StateDictType.FULL_STATE_DICT,
                                FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
                                FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only))
