"""chop: task-agnostic compression of large language models."""

from importlib import import_module
from typing import Any

# Imported on first use, so that `python -m chop eval` and `import chop.eval` start without Lightning.
_EXPORTS = {
    "ClassificationDataModule": "chop.training.classification_data",
    "ContinuedPretraining": "chop.training.pretrain",
    "Distillation": "chop.training.distill",
    "DistillLoss": "chop.training.distill",
    "LayerChop": "chop.pruning.layerchop",
    "PromptClassification": "chop.training.classify",
    "StreamingDataModule": "chop.training.pretraining_data",
    "ZeroShotEvalCallback": "chop.training.zero_shot",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'chop' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
