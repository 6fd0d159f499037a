"""The loop every pruner runs: shot t of T prunes to t/T of the target with fresh scores, keeps rank 0's decisions
under data parallelism, records the achieved sparsity (and held-out perplexity) per shot, and at the end slices removed
structures out of the weights."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
from transformers import PreTrainedModel

from chop.pruning import ranks
from chop.pruning.pruner import Pruner, Report
from chop.pruning.structures import Structure, allocation, linears, prunable_params, shrink, structures

log = logging.getLogger(__name__)


@dataclass
class State:
    """What a pruner has removed so far: structures (structured) or a mask per linear (True = removed)."""

    model: PreTrainedModel
    layers: dict[str, nn.Linear]
    total: int
    groups: list[Structure] = field(default_factory=list)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    sliced: int = 0  # parameters already sliced out of the decoder linears (hidden channels)

    def removed(self) -> int:
        return (self.sliced + sum(s.params for s in self.groups if s.removed)
                + sum(int(m.sum()) for m in self.masks.values()))


# One shot: bring ``state`` to ``target`` sparsity; returns extra entries for the shot's record.
Shot = Callable[[State, float, int], Optional[dict]]


def run(model: PreTrainedModel, spec: Pruner, shot: Shot, evaluate: Optional[Callable[[PreTrainedModel], float]] = None,
        on_shot: Optional[Callable[[int, dict], None]] = None) -> Report:
    """Prune ``model`` in place: ``spec.shots`` calls of ``shot``, then (structured) the slicing."""
    spec.check(model.config)
    layers = linears(model)
    state = State(model, layers, prunable_params(layers), structures(model) if spec.mode == "structured" else [])
    report = Report(spec.method, spec.mode, spec.target(spec.shots), state.total)
    for t in range(1, spec.shots + 1):
        target = spec.target(t)
        extra = shot(state, target, t) or {}
        agree_with_rank0(state)
        record = {"shot": t, "target": target, "sparsity": state.removed() / state.total,
                  "layers": allocation(state.layers, state.groups, state.masks), **extra}
        if evaluate is not None:
            record["ppl"] = evaluate(model)
        report.shots.append(record)
        log.info("%s shot %d/%d: sparsity %.4f (target %.4f)%s", spec.method, t, spec.shots, record["sparsity"], target,
                 f", held-out ppl {record['ppl']:.3f}" if "ppl" in record else "")
        if on_shot is not None:
            on_shot(t, record)
    report.layers = report.shots[-1]["layers"]
    if spec.mode == "structured":
        report.kept = shrink(model, state.groups)
    report.params_after = prunable_params(linears(model)) - sum(int(m.sum()) for m in state.masks.values())
    return report


def agree_with_rank0(state: State) -> None:
    """Under data parallelism, every rank keeps rank 0's removals and weights after a shot. Every rank computed them
    from the same summed statistics, so they differ at most by the rounding of their own kernels; the next shot's
    decisions must not."""
    if ranks.rank_and_world()[1] == 1:
        return
    removed = ranks.object_from_rank0([s.removed for s in state.groups])
    for s, r in zip(state.groups, removed):
        s.removed = r
    ranks.from_rank0([p for layer in state.layers.values() for p in layer.parameters()] + list(state.masks.values()))


def zero_removed(state: State) -> None:
    """Set the removed rows, columns or weights to zero (pruners that do not update the rest)."""
    with torch.no_grad():
        for name, mask in state.masks.items():
            state.layers[name].weight.masked_fill_(mask, 0.0)
        for s in state.groups:
            if s.removed:
                for p in s.parts:
                    layer = state.layers[p.name]
                    idx = torch.tensor(p.index, device=layer.weight.device)
                    layer.weight.index_fill_(p.axis, idx, 0.0)
                    if p.axis == 0 and layer.bias is not None:
                        layer.bias.index_fill_(0, idx, 0.0)

