"""chop: task-agnostic compression of large language models."""

from chop.data.streaming import StreamingDataModule
from chop.pruning.layerchop import LayerChop
from chop.training.pretrain import ContinuedPretraining

__all__ = ["ContinuedPretraining", "LayerChop", "StreamingDataModule"]
