"""The smaller model every chop entry point starts from: load, chop layers, prune. ``chop fit`` (and with it the depth
sweep) trains it, ``chop prune`` writes it."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

from transformers import PreTrainedModel

from chop.pruning.layerchop import ChopPlan, LayerChop, chop
from chop.pruning.pruner import CalibrationData, Pruner, Report, calibration_batches

log = logging.getLogger(__name__)


@dataclass
class Student:
    model: PreTrainedModel
    plan: Optional[ChopPlan] = None  # which layers the chop kept
    report: Optional[Report] = None  # what the pruner removed


def build_student(load: Callable[[], PreTrainedModel], layers: Optional[LayerChop] = None,
                  pruning: Optional[Pruner] = None, data: Optional[CalibrationData] = None,
                  evaluate: Optional[Callable[[PreTrainedModel], float]] = None,
                  on_shot: Optional[Callable[[int, dict], None]] = None) -> Student:
    """``load()`` the model, remove the decoder layers ``layers`` names, then prune it by ``pruning``; calibration text
    (``block_influence``, data-driven pruners) comes from ``data``. ``evaluate``/``on_shot``: see ``Pruner.prune``."""
    student = Student(load())
    if layers is not None:
        calibration: Any = None
        if layers.needs_calibration:
            if data is None:
                raise ValueError(f"chop.strategy: {layers.strategy} needs calibration text, and none was given")
            calibration = data.calibration_batches(layers.calibration_batches)
        student.plan = chop(student.model, layers, calibration)
        log.info("chop plan: kept %s; parameters %d -> %d", student.plan.kept, student.plan.params_before,
                 student.plan.params_after)
    if pruning is not None:
        student.report = pruning.prune(student.model, calibration_batches(pruning, data), evaluate, on_shot)
    return student
