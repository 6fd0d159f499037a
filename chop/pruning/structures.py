"""Structured pruning's units: every MLP hidden unit (a row of each MLP input linear, a column of the output linear)
and attention group (a key/value head with the query heads that share it: rows of q/k/v, columns of the output
projection); choosing which to remove, by one threshold over all layers or the same count in every layer; and slicing
them out, so the model is physically smaller."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from chop.models.registry import architecture, decoder_layers
from chop.models.per_layer_widths import set_attention_heads, slice_linear
from chop.models.widths import set_widths


@dataclass
class Part:
    """Rows or columns ``index`` of the linear ``name``."""

    name: str
    axis: int  # 0: rows, 1: columns
    index: list[int]


@dataclass
class Structure:
    layer: int
    kind: str  # "mlp" or "attention"
    unit: int  # hidden unit, or key/value head
    parts: list[Part]
    params: int
    removed: bool = False


def linears(model: PreTrainedModel) -> dict[str, nn.Linear]:
    """The decoder blocks' linear layers by their full names (embeddings and the LM head are not among them)."""
    path = architecture(model.config).layers
    return {f"{path}.{i}.{name}": module for i, block in enumerate(decoder_layers(model))
            for name, module in block.named_modules() if isinstance(module, nn.Linear)}


def prunable_params(layers: dict[str, nn.Linear]) -> int:
    return sum(l.weight.numel() + (l.bias.numel() if l.bias is not None else 0) for l in layers.values())


def structures(model: PreTrainedModel) -> list[Structure]:
    """Every MLP hidden unit and attention group of every decoder block."""
    config = model.config.get_text_config()
    arch = architecture(config)
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    out: list[Structure] = []
    for i, block in enumerate(decoder_layers(model)):
        prefix = f"{arch.layers}.{i}."
        mods = dict(block.named_modules())
        q, k, v, o = (mods[n] for n in arch.attention)
        head_dim = k.out_features // kv
        rep = q.out_features // head_dim // kv
        for g in range(k.out_features // head_dim):
            q_rows = [h * head_dim + d for h in range(g * rep, (g + 1) * rep) for d in range(head_dim)]
            kv_rows = list(range(g * head_dim, (g + 1) * head_dim))
            parts = [Part(prefix + arch.attention[0], 0, q_rows), Part(prefix + arch.attention[1], 0, kv_rows),
                     Part(prefix + arch.attention[2], 0, kv_rows), Part(prefix + arch.attention[3], 1, q_rows)]
            out.append(Structure(i, "attention", g, parts, _params(mods, parts, prefix)))
        width = mods[arch.mlp_out].in_features
        for u in range(width):
            parts = [Part(prefix + n, 0, [u]) for n in arch.mlp_in] + [Part(prefix + arch.mlp_out, 1, [u])]
            out.append(Structure(i, "mlp", u, parts, _params(mods, parts, prefix)))
    return out


def _params(mods: dict[str, nn.Module], parts: list[Part], prefix: str) -> int:
    n = 0
    for part in parts:
        layer = mods[part.name.removeprefix(prefix)]
        n += len(part.index) * (layer.in_features + (layer.bias is not None) if part.axis == 0 else layer.out_features)
    return n


def removed_parts(groups: list[Structure]) -> Iterator[Part]:
    """The rows and columns of every structure removed so far."""
    return (p for s in groups if s.removed for p in s.parts)


def allocation(layers: dict[str, nn.Linear], groups: list[Structure], masks: dict[str, torch.Tensor]) -> dict[str, float]:
    """The fraction of each linear's weights removed so far (by structures, or by element ``masks``)."""
    if masks:
        return {name: float(masks[name].float().mean()) for name in layers}
    gone = {name: 0 for name in layers}
    for p in removed_parts(groups):
        layer = layers[p.name]
        gone[p.name] += len(p.index) * (layer.in_features if p.axis == 0 else layer.out_features)
    return {name: gone[name] / layers[name].weight.numel() for name in layers}


# -- which to remove ----------------------------------------------------------------------------------------------
def choose(groups: list[Structure], cost: Sequence[float], budget: float, align: int = 1, uniform: bool = False) -> set[int]:
    """Mark structures removed until ``budget`` parameters are gone in all (earlier removals count and stand) and
    return the indices removed now. Global: the cheapest first over all layers, never a layer's last MLP unit or
    attention group; each layer's kept MLP units then rounded to a multiple of ``align``. ``uniform``: every layer
    keeps the same widths (a standard config any tool loads): slices of one more attention group, or ``align`` more MLP
    units, in every layer, the cheapest per parameter first (slices differ in size by orders of magnitude)."""
    removed = sum(s.params for s in groups if s.removed)
    if uniform:
        return _choose_uniform(groups, cost, budget - removed, align)
    left: dict[tuple[int, str], int] = {}
    for s in groups:
        left[(s.layer, s.kind)] = left.get((s.layer, s.kind), 0) + (not s.removed)
    new = set()
    for k in sorted(range(len(groups)), key=cost.__getitem__):
        s = groups[k]
        if removed >= budget:
            break
        if s.removed or left[(s.layer, s.kind)] <= 1:
            continue
        s.removed, removed, left[(s.layer, s.kind)] = True, removed + s.params, left[(s.layer, s.kind)] - 1
        new.add(k)
    if align > 1:
        _align(groups, cost, new, align)
    return new


def by_layer(groups: list[Structure], kind: str) -> dict[int, list[int]]:
    """The indices of each layer's not yet removed structures of ``kind``."""
    out: dict[int, list[int]] = {}
    for k, s in enumerate(groups):
        if s.kind == kind and not s.removed:
            out.setdefault(s.layer, []).append(k)
    return out


def _choose_uniform(groups: list[Structure], cost: Sequence[float], budget: float, align: int) -> set[int]:
    queues = {kind: {layer: sorted(ks, key=cost.__getitem__) for layer, ks in by_layer(groups, kind).items()}
              for kind in ("mlp", "attention")}
    step = {"mlp": align, "attention": 1}
    new: set[int] = set()
    for kind, layers in queues.items():  # an MLP width that is not a multiple of align loses its remainder first
        width = min(len(q) for q in layers.values()) if layers else 0
        if kind == "mlp" and width % align and width > align:
            for q in layers.values():
                new.update(q[:width % align])
                del q[:width % align]
    budget -= sum(groups[k].params for k in new)

    def next_slice(kind: str) -> list[int]:
        layers = queues[kind]
        if not layers or min(len(q) for q in layers.values()) <= step[kind]:  # never a layer's last unit or group
            return []
        return [k for q in layers.values() for k in q[:step[kind]]]

    while budget > 0:
        slices = {kind: s for kind in queues if (s := next_slice(kind))}
        if not slices:
            break
        kind = min(slices, key=lambda kd: sum(cost[k] for k in slices[kd]) / sum(groups[k].params for k in slices[kd]))
        for q in queues[kind].values():
            del q[:step[kind]]
        new.update(slices[kind])
        budget -= sum(groups[k].params for k in slices[kind])
    for k in new:
        groups[k].removed = True
    return new


def _align(groups: list[Structure], cost: Sequence[float], new: set[int], align: int) -> None:
    """Round each layer's kept MLP units to a multiple of ``align``: remove its next cheapest units, or keep this
    shot's most expensive choices (earlier shots' removals stand)."""
    units_of: dict[int, list[int]] = {}
    for k, s in enumerate(groups):
        if s.kind == "mlp":
            units_of.setdefault(s.layer, []).append(k)
    for units in units_of.values():
        kept = sum(not groups[k].removed for k in units)
        ceiling = sum(not groups[k].removed or k in new for k in units)  # kept before this shot
        want = min(ceiling, max(align, round(kept / align) * align))
        if kept > want:
            for k in sorted((k for k in units if not groups[k].removed), key=cost.__getitem__)[:kept - want]:
                groups[k].removed = True
                new.add(k)
        elif kept < want:
            for k in sorted((k for k in units if k in new), key=cost.__getitem__, reverse=True)[:want - kept]:
                groups[k].removed = False
                new.discard(k)


# -- physically smaller matrices ----------------------------------------------------------------------------------
def shrink(model: PreTrainedModel, groups: list[Structure]) -> dict[str, Any]:
    """Slice removed structures out of the weights and record per-layer widths in the config
    (``chop_widths``: MLP units and key/value heads per layer; uniform widths also set the config's own fields)."""
    config = model.config.get_text_config()
    arch = architecture(config)
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    rep = config.num_attention_heads // kv
    layers = linears(model)
    keep: dict[tuple[str, int], set[int]] = {}
    for s in groups:
        for p in s.parts:
            if (p.name, p.axis) not in keep:  # built once per matrix and axis, not once per structure
                layer = layers[p.name]
                keep[p.name, p.axis] = set(range(layer.out_features if p.axis == 0 else layer.in_features))
    for p in removed_parts(groups):
        keep[p.name, p.axis].difference_update(p.index)
    for (name, axis), idx in keep.items():
        slice_linear(model, name, axis, sorted(idx))
    widths = []
    for i, block in enumerate(decoder_layers(model)):
        mods = dict(block.named_modules())
        units = mods[arch.mlp_out].in_features
        heads = sum(1 for s in groups if s.layer == i and s.kind == "attention" and not s.removed)
        widths.append({"intermediate_size": units, "num_key_value_heads": heads, "num_attention_heads": heads * rep})
        set_attention_heads(mods[arch.attention[0].rsplit(".", 1)[0]], heads * rep, heads)
    set_widths(model.config, widths)
    return {"widths": widths}
