"""chop: task-agnostic compression of large language models."""

from chop.data.classification import ClassificationDataModule
from chop.data.streaming import StreamingDataModule
from chop.pruning.layerchop import LayerChop
from chop.training.classify import PromptClassification
from chop.training.distill import Distillation, DistillLoss
from chop.training.pretrain import ContinuedPretraining

__all__ = ["ClassificationDataModule", "ContinuedPretraining", "Distillation", "DistillLoss", "LayerChop",
           "PromptClassification", "StreamingDataModule"]
