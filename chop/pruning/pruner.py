"""What every pruning method is: a dataclass of its own settings that checks them against a model's config before any
weights load, and ``prune(model, batches)`` that prunes the model in place and reports what it removed. The methods are
listed in ``chop.pruning.registry``; the calibration text comes from anything with ``calibration_batches``."""

from __future__ import annotations

import typing
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Optional, Protocol, runtime_checkable

import torch
from transformers import PreTrainedModel

from chop.models.registry import architecture

Mode = Literal["structured", "semistructured", "unstructured"]


@runtime_checkable
class CalibrationData(Protocol):
    """Where a data-driven pruner (or ``block_influence`` chop) gets its text: ``n`` batches of token ids
    ``[batch, seq + 1]``. ``StreamingDataModule`` implements it; a data module without it is refused when the config
    is read, before any weights load."""

    def calibration_batches(self, n: int) -> list[torch.Tensor]: ...


@dataclass
class Report:
    """What was removed: per shot the achieved sparsity (and held-out perplexity) and each linear's sparsity; ``layers``
    the final allocation; ``kept`` the per-layer widths after slicing (structured)."""

    method: str
    mode: str
    target: float
    params_before: int
    params_after: int = 0
    shots: list[dict] = field(default_factory=list)
    layers: dict[str, float] = field(default_factory=dict)
    kept: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


class Pruner:
    """Base of the pruning methods' settings (each a dataclass with a ``method`` literal). Class-level defaults say
    what a method without those fields means: no calibration text, one shot, structured."""

    method: str
    mode: str = "structured"
    shots: int = 1
    calibration_samples: int = 0
    seq_len: Optional[int] = None
    batch_size: int = 4

    def check(self, config: Any) -> None:
        """Refuse bad settings, and models without what the method needs, before any weights or data load."""
        fields = vars(self)
        for name, hint in typing.get_type_hints(type(self)).items():  # Python callers skip the parser's checks
            many = typing.get_origin(hint) is list
            hint = typing.get_args(hint)[0] if many else hint
            choices = typing.get_args(hint) if typing.get_origin(hint) is Literal else ()
            for value in (fields.get(name) or []) if many else [fields.get(name)]:
                if name in fields and choices and value not in choices:
                    raise ValueError(f"pruning.{name}: '{value}' is not one of {list(choices)}")
        if self.mode == "semistructured":
            if not 0 < self.n < self.m:
                raise ValueError(f"pruning.n/m: {self.n}:{self.m} must have 0 < n < m (e.g. 2:4)")
        elif not 0 < self.sparsity < 1:
            raise ValueError(f"pruning.sparsity: {self.sparsity} must be in (0, 1)")
        if self.shots < 1:
            raise ValueError(f"pruning.shots: {self.shots} must be >= 1")
        if fields.get("align", 1) < 1:
            raise ValueError(f"pruning.align: {self.align} must be >= 1 (1: no rounding of the kept widths)")
        if "calibration_samples" in fields and (self.calibration_samples < 1 or self.batch_size < 1):
            raise ValueError(f"pruning.calibration_samples ({self.calibration_samples}) and pruning.batch_size "
                             f"({self.batch_size}) must be >= 1: {self.method} needs calibration text")
        arch = architecture(config)  # an unknown architecture: an error that says how to register it
        if self.mode == "structured" and (arch.attention is None or arch.mlp_in is None):
            raise ValueError(f"pruning.mode: structured pruning needs separate attention and MLP linears, which chop's "
                             f"registry does not name for '{config.model_type}'; use unstructured or semistructured")

    def target(self, shot: int) -> float:
        """The sparsity after shot ``shot`` (1-based): a linear schedule to the final one."""
        final = self.n / self.m if self.mode == "semistructured" else self.sparsity
        return final * shot / self.shots

    def prune(self, model: PreTrainedModel, batches: Sequence[torch.Tensor],
              evaluate: Optional[Callable[[PreTrainedModel], float]] = None,
              on_shot: Optional[Callable[[int, dict], None]] = None) -> Report:
        """Prune ``model`` in place using calibration ``batches`` (token ids, [batch, seq + 1]); ``evaluate(model)``
        (e.g. held-out perplexity) is recorded after every shot, and ``on_shot(shot, record)`` sees each record."""
        raise NotImplementedError


def calibration_batches(spec: Pruner, data: Any) -> list[torch.Tensor]:
    """The calibration batches ``spec`` asks for, from ``data`` (a ``CalibrationData``): none for a method that needs
    no text."""
    if not spec.calibration_samples:
        return []
    if data is None or not isinstance(data, CalibrationData):
        raise ValueError(refusal("model.pruning", spec.method, data))
    batch = getattr(data, "hparams", {}).get("batch_size") or spec.batch_size
    return data.calibration_batches(-(-spec.calibration_samples // batch))


def refusal(field: str, need: str, data: Any) -> str:
    """The error for a method that needs calibration text from a data module without it."""
    return (f"{field}: {need} needs calibration text, which {type(data).__name__} does not provide (it has no "
            f"calibration_batches); train on a data module that implements chop.pruning.pruner.CalibrationData "
            f"(StreamingDataModule does), or make the smaller model first (chop prune, or a streaming run) and "
            f"train that")
