"""chop: task-agnostic compression of large language models."""

from chop.data.streaming import StreamingDataModule
from chop.pruning.layerchop import LayerChop
from chop.training.distill import Distillation, DistillLoss
from chop.training.pretrain import ContinuedPretraining

__all__ = ["ContinuedPretraining", "Distillation", "DistillLoss", "LayerChop", "StreamingDataModule"]
