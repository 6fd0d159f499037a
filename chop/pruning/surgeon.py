"""LLM Surgeon (arXiv 2312.17244): prune rows/columns (structured), n:m blocks (semistructured) or single weights
(unstructured) of a model's decoder linears by Kronecker-factored curvature, with correlated updates of the remaining
weights, over several shots with one global threshold across layers.

Structured pruning removes coupled structures together, so the result is physically smaller: an MLP hidden unit is a
row of each MLP input linear (up/gate, or fc1) and a column of the output linear; an attention group is one key/value
head with the query heads that share it (GQA kept consistent) as rows of q/k/v and columns of the output projection.
A structure's cost is the sum of its parts' row and column costs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch
from torch import nn
from transformers import PreTrainedModel

from chop.models.registry import architecture, decoder_layers
from chop.models.widths import set_attention_heads, set_widths, slice_linear
from chop.pruning import kfac, lora, ranks

log = logging.getLogger(__name__)

MODES = ("structured", "semistructured", "unstructured")


@dataclass
class Surgeon:
    """LLM Surgeon settings (the paper's defaults: 40 shots to 50%, 128 calibration sequences, damping 0.01).

    Args:
        mode: structured, semistructured (n:m) or unstructured.
        sparsity: the fraction of the decoder linears' weights to remove (semistructured: n/m, fixed).
        shots: prune in this many steps, shot t to t·sparsity/shots, re-estimating the curvature each time.
        n, m: semistructured: n zeros in every m consecutive weights of a row (2:4).
        calibration_samples: calibration sequences (of the model's context length, or ``seq_len``).
        seq_len: calibration sequence length (default: the model's context length).
        damping_a, damping_g: λ·mean(diag) added to each Kronecker factor before inverting.
        fisher_samples: 0: the empirical Fisher (the data's next tokens); k: k label draws from the model.
        obd: K-OBD: costs from the diagonal curvature and no weight updates (the paper's baseline).
        magnitude: the magnitude baseline: costs ½W² (no curvature), no weight updates.
        max_correlate: unstructured/semistructured: weights whose updates are solved jointly, per chunk.
        factors_device: where the curvature factors accumulate (``cpu`` saves GPU memory).
        batch_size: calibration sequences per forward/backward pass.
        update_rows: structured: also give the linears whose rows are removed (q/k/v, up/gate) the correlated row
            update. Off by default: a removed unit's outputs feed only the columns removed with it, so the column
            update of the consuming linear (o, down) is the compensation; updating both compensates twice.
        align: structured: every layer keeps a multiple of this many MLP units, so the sliced matrices stay fast on
            GPUs (an odd width, e.g. 3,943, runs a bf16 matmul ~6x slower than 3,944 on an H100); 1: exact target.
        lora_rank: > 0: after each shot, first-order updates: rank-``lora_rank`` adapters on every decoder linear,
            trained by the LM loss on calibration batches with pruned entries masked, then merged (0: off).
        lora_lr: the adapters' learning rate (AdamW, one step per batch).
        lora_fraction: the share of the calibration batches each shot but the last trains on (a different share
            each shot).
        lora_final: the share after the last shot (the paper's longer final pass).
        blocks_per_pass: structured: > 0 gathers the curvature of this many decoder blocks at a time (a forward and
            backward pass over the calibration data each), keeping only their costs and the inverses the updates
            need, so the factors of one group of blocks are resident instead of all (0: all blocks in one pass).
    """

    mode: str = "structured"
    sparsity: float = 0.3
    shots: int = 5
    n: int = 2
    m: int = 4
    calibration_samples: int = 128
    seq_len: Optional[int] = None
    damping_a: float = 0.01
    damping_g: float = 0.01
    fisher_samples: int = 0
    obd: bool = False
    magnitude: bool = False
    max_correlate: int = 2048
    factors_device: Optional[str] = None
    batch_size: int = 4
    update_rows: bool = False
    align: int = 8
    lora_rank: int = 0
    lora_lr: float = 1e-4
    lora_fraction: float = 0.1
    lora_final: float = 1.0
    blocks_per_pass: int = 0

    def check(self, config: Any) -> None:
        """Refuse bad settings, and models without what the mode needs, before any weights or data load."""
        if self.mode not in MODES:
            raise ValueError(f"surgeon.mode: '{self.mode}' is not one of {list(MODES)}")
        if self.mode == "semistructured":
            if not 0 < self.n < self.m:
                raise ValueError(f"surgeon.n/m: {self.n}:{self.m} must have 0 < n < m (e.g. 2:4)")
        elif not 0 < self.sparsity < 1:
            raise ValueError(f"surgeon.sparsity: {self.sparsity} must be in (0, 1)")
        if self.shots < 1:
            raise ValueError(f"surgeon.shots: {self.shots} must be >= 1")
        if self.align < 1:
            raise ValueError(f"surgeon.align: {self.align} must be >= 1 (1: no rounding of the kept widths)")
        if self.calibration_samples < 1 or self.batch_size < 1:
            raise ValueError("surgeon.calibration_samples and surgeon.batch_size must be >= 1")
        if self.obd and self.magnitude:
            raise ValueError("surgeon.obd and surgeon.magnitude: choose one baseline")
        if self.damping_a < 0 or self.damping_g < 0:
            raise ValueError("surgeon.damping_a/damping_g must be >= 0")
        if self.lora_rank < 0 or self.lora_lr <= 0:
            raise ValueError(f"surgeon.lora_rank ({self.lora_rank}) must be >= 0 (0: off) and surgeon.lora_lr "
                             f"({self.lora_lr}) > 0")
        for name in ("lora_fraction", "lora_final"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"surgeon.{name}: {getattr(self, name)} must be in (0, 1], a share of the "
                                 f"calibration batches")
        if self.blocks_per_pass < 0:
            raise ValueError(f"surgeon.blocks_per_pass: {self.blocks_per_pass} must be >= 0 (0: all blocks at once)")
        if self.blocks_per_pass and self.mode != "structured":
            raise ValueError(f"surgeon.blocks_per_pass: only structured pruning gathers the curvature block by block "
                             f"({self.mode} updates need every layer's inverses at once); set it to 0")
        arch = architecture(config)  # an unknown architecture: an error that says how to register it
        if self.mode == "structured" and (arch.attention is None or arch.mlp_in is None):
            raise ValueError(f"surgeon.mode: structured pruning needs separate attention and MLP linears, which chop's "
                             f"registry does not name for '{config.model_type}'; use unstructured or semistructured")

    def target(self, shot: int) -> float:
        """The sparsity after shot ``shot`` (1-based): a linear schedule to the final one."""
        final = self.n / self.m if self.mode == "semistructured" else self.sparsity
        return final * shot / self.shots


# -- structures ---------------------------------------------------------------------------------------------------
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


def removed_parts(groups: list[Structure]) -> Iterator[Part]:
    """The rows and columns of every structure removed so far."""
    return (p for s in groups if s.removed for p in s.parts)


def _params(mods: dict[str, nn.Module], parts: list[Part], prefix: str) -> int:
    n = 0
    for part in parts:
        layer = mods[part.name.removeprefix(prefix)]
        n += len(part.index) * (layer.in_features + (layer.bias is not None) if part.axis == 0 else layer.out_features)
    return n


# -- the surgeon --------------------------------------------------------------------------------------------------
@dataclass
class Report:
    """What was removed: per shot the achieved sparsity (and held-out perplexity) and each linear's sparsity; ``layers``
    the final allocation; ``kept`` the per-layer widths after slicing (structured)."""

    mode: str
    target: float
    params_before: int
    params_after: int = 0
    shots: list[dict] = field(default_factory=list)
    layers: dict[str, float] = field(default_factory=dict)
    kept: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def prunable_params(layers: dict[str, nn.Linear]) -> int:
    return sum(l.weight.numel() + (l.bias.numel() if l.bias is not None else 0) for l in layers.values())


def prune(model: PreTrainedModel, spec: Surgeon, batches: Sequence[torch.Tensor],
          evaluate: Optional[Callable[[PreTrainedModel], float]] = None,
          on_shot: Optional[Callable[[int, dict], None]] = None) -> Report:
    """Prune ``model`` in place by ``spec`` using calibration ``batches`` (token ids, [batch, seq + 1]).

    ``evaluate(model)`` (e.g. held-out perplexity) is logged after every shot; ``on_shot(shot, record)`` sees each
    shot's record. Structured pruning ends by slicing the removed structures out (smaller matrices).
    """
    spec.check(model.config)
    layers = linears(model)
    total = prunable_params(layers)
    report = Report(spec.mode, spec.target(spec.shots), total)
    groups = structures(model) if spec.mode == "structured" else []
    masks: dict[str, torch.Tensor] = {}
    for shot in range(1, spec.shots + 1):
        target = spec.target(shot)
        if spec.mode == "structured":
            _structured_shot(layers, _curvature(model, layers, batches, spec), groups, target * total, spec)
            removed = sum(s.params for s in groups if s.removed)
        else:
            factors = next(_curvature(model, layers, batches, spec))
            _element_shot(layers, factors, masks, target, spec)
            removed = sum(int(m.sum()) for m in masks.values())
            del factors
        record = {"shot": shot, "target": target, "sparsity": removed / total,
                  "layers": allocation(layers, groups, masks)}
        if spec.lora_rank:
            share = _share(batches, spec.lora_final if shot == spec.shots else spec.lora_fraction, shot)
            record["lora_loss"] = lora.train(model, layers, _kept(layers, groups, masks), share, spec.lora_rank,
                                             spec.lora_lr)
        _agree_with_rank0(layers, groups, masks)
        if evaluate is not None:
            record["ppl"] = evaluate(model)
        report.shots.append(record)
        log.info("surgeon shot %d/%d: sparsity %.4f (target %.4f)%s", shot, spec.shots, record["sparsity"], target,
                 f", held-out ppl {record['ppl']:.3f}" if "ppl" in record else "")
        if on_shot is not None:
            on_shot(shot, record)
    report.layers = report.shots[-1]["layers"]
    if spec.mode == "structured":
        report.kept = shrink(model, groups)
    report.params_after = prunable_params(linears(model)) - sum(int(m.sum()) for m in masks.values())
    return report


def _agree_with_rank0(layers: dict[str, nn.Linear], groups: list[Structure], masks: dict[str, torch.Tensor]) -> None:
    """Under data parallelism, every rank keeps rank 0's removals and weights after a shot. Every rank computed them
    from the same summed curvature, so they differ at most by the rounding of their own kernels; the next shot's
    decisions must not."""
    if ranks.rank_and_world()[1] == 1:
        return
    removed = ranks.object_from_rank0([s.removed for s in groups])
    for s, r in zip(groups, removed):
        s.removed = r
    ranks.from_rank0([p for layer in layers.values() for p in layer.parameters()] + list(masks.values()))


def allocation(layers: dict[str, nn.Linear], groups: list[Structure], masks: dict[str, torch.Tensor]) -> dict[str, float]:
    """The fraction of each linear's weights removed so far."""
    if masks:
        return {name: float(masks[name].float().mean()) for name in layers}
    gone = {name: 0 for name in layers}
    for p in removed_parts(groups):
        layer = layers[p.name]
        gone[p.name] += len(p.index) * (layer.in_features if p.axis == 0 else layer.out_features)
    return {name: gone[name] / layers[name].weight.numel() for name in layers}


def _share(batches: Sequence[torch.Tensor], fraction: float, shot: int) -> list[torch.Tensor]:
    """``fraction`` of the batches, a different run of them each shot (wrapping around)."""
    k = max(1, round(fraction * len(batches)))
    return [batches[((shot - 1) * k + i) % len(batches)] for i in range(k)]


def _kept(layers: dict[str, nn.Linear], groups: list[Structure], masks: dict[str, torch.Tensor]) -> dict[str, lora.Keep]:
    """What each linear keeps, for the adapters: removed rows and columns (structured) or weights (masks) are 0."""
    if masks:
        return {name: (~masks[name]).float() for name in layers}
    keep = {name: (torch.ones(l.out_features, device=l.weight.device), torch.ones(l.in_features, device=l.weight.device))
            for name, l in layers.items()}
    for p in removed_parts(groups):
        keep[p.name][p.axis][p.index] = 0.0
    return keep


def _curvature(model: PreTrainedModel, layers: dict[str, nn.Linear], batches: Sequence[torch.Tensor],
               spec: Surgeon) -> Iterator[dict[str, kfac.Factors]]:
    """The layers' factors (inverted, unless a diagonal baseline needs none): all in one pass, or
    ``blocks_per_pass`` decoder blocks' at a time, each group from its own pass over the unchanged model."""
    if spec.magnitude:
        yield _magnitude_factors(layers)
        return
    device = torch.device(spec.factors_device) if spec.factors_device else None
    n = len(decoder_layers(model))
    step = spec.blocks_per_pass or n
    prefix = architecture(model.config).layers
    for start in range(0, n, step):
        blocks = tuple(f"{prefix}.{i}." for i in range(start, min(n, start + step)))
        factors = kfac.collect(model, {k: v for k, v in layers.items() if k.startswith(blocks)}, batches,
                               spec.fisher_samples, device)
        if not spec.obd:
            for f in factors.values():
                f.invert(spec.damping_a, spec.damping_g)
        yield factors
        del factors


def _magnitude_factors(layers: dict[str, nn.Linear]) -> dict[str, kfac.Factors]:
    """Identity curvature (as diagonals): the K-OBD costs become ½W², the magnitude criterion."""
    ones = lambda n, layer: torch.ones(n, dtype=torch.float64, device=layer.weight.device)  # noqa: E731
    return {name: kfac.Factors(ones(layer.in_features + (layer.bias is not None), layer), ones(layer.out_features, layer))
            for name, layer in layers.items()}


def _structured_shot(layers: dict[str, nn.Linear], passes: Iterable[dict[str, kfac.Factors]], groups: list[Structure],
                     budget: float, spec: Surgeon) -> None:
    """Remove the cheapest structures (by the sum of their parts' costs) until ``budget`` parameters are gone, never a
    layer's last MLP unit or attention group, then give each consuming linear the correlated update for all its
    removed columns (and, with ``update_rows``, each producing linear the update for its rows). ``passes`` yields the
    factors of some of the layers at a time; only the costs and the inverses the updates need are kept."""
    diagonal = spec.obd or spec.magnitude  # costs from the diagonal, no updates
    row_cost, col_cost = (kfac.row_costs_obd, kfac.column_costs_obd) if diagonal else (kfac.row_costs, kfac.column_costs)
    consumers = {p.name for s in groups for p in s.parts if p.axis == 1}
    parts: dict[tuple[str, int], list[float]] = {}  # plain lists: many small index sums, no device round trip each
    kept: dict[str, kfac.Factors] = {}
    for factors in passes:
        while factors:  # each layer's factors freed once its costs are out
            name, f = factors.popitem()
            w = kfac.weight_matrix(layers[name])  # float64 copies one at a time, not the whole model's at once
            parts[name, 0] = row_cost(w, f.to(w.device)).tolist()
            parts[name, 1] = col_cost(w, f.to(w.device))[:layers[name].in_features].tolist()
            if not diagonal:
                kept[name] = kfac.Factors(None, None, f.A_inv if name in consumers else None,
                                          f.G_inv if spec.update_rows and name not in consumers else None)
    cost = [sum(sum(parts[p.name, p.axis][i] for i in p.index) for p in s.parts) for s in groups]
    removed = sum(s.params for s in groups if s.removed)
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
    if spec.align > 1:
        _align(groups, cost, new, spec.align)
    gone: dict[tuple[str, int], list[int]] = {}
    for p in removed_parts(groups):
        gone.setdefault((p.name, p.axis), []).extend(p.index)
    for (name, axis), index in gone.items():
        w, f = kfac.weight_matrix(layers[name]), kept.get(name)
        f = f.to(w.device) if f is not None else None
        idx = torch.tensor(sorted(index), device=w.device)
        if not diagonal and axis == 1:
            w = kfac.remove_columns(w, f, idx)
        elif not diagonal and spec.update_rows:
            w = kfac.remove_rows(w, f, idx)
        else:  # baselines; or removed rows, whose outputs feed only the columns removed with them: just zeros
            w = w.clone()
            if axis == 0:
                w[idx] = 0.0
            else:
                w[:, idx] = 0.0
        kfac.set_weight_matrix(layers[name], w.to(layers[name].weight.dtype))


def _align(groups: list[Structure], cost: list[float], new: set[int], align: int) -> None:
    """Round each layer's kept MLP units to a multiple of ``align``: remove its next cheapest units, or keep this
    shot's most expensive choices (earlier shots' removals stand)."""
    by_layer: dict[int, list[int]] = {}
    for k, s in enumerate(groups):
        if s.kind == "mlp":
            by_layer.setdefault(s.layer, []).append(k)
    for units in by_layer.values():
        kept = sum(not groups[k].removed for k in units)
        ceiling = sum(not groups[k].removed or k in new for k in units)  # kept before this shot
        want = min(ceiling, max(align, round(kept / align) * align))
        if kept > want:
            for k in sorted((k for k in units if not groups[k].removed), key=cost.__getitem__)[:kept - want]:
                groups[k].removed = True
        elif kept < want:
            for k in sorted((k for k in units if k in new), key=cost.__getitem__, reverse=True)[:want - kept]:
                groups[k].removed = False


def _element_shot(layers: dict[str, nn.Linear], factors: dict[str, kfac.Factors], masks: dict[str, torch.Tensor],
                  target: float, spec: Surgeon) -> None:
    """Unstructured: one threshold over all layers' element costs; semistructured: the cheapest n:m groups until
    ``target`` of the weights are zero. Removed weights stay removed (cost 0)."""
    costs = {}
    for name, layer in layers.items():
        w = layer.weight.detach().double()
        f = factors[name]
        if layer.bias is not None:  # the bias is not pruned: its row/column of the factors drops out
            f = kfac.Factors(f.A[:-1] if f.A.dim() == 1 else f.A[:-1, :-1], f.G,
                             None if f.A_inv is None else _schur_inverse(f.A_inv), f.G_inv)
        c = (kfac.element_costs_obd if spec.obd or spec.magnitude else kfac.element_costs)(w, f.to(w.device))
        if name in masks:
            c[masks[name]] = 0.0
        costs[name] = (c, f)
    new_masks = {}
    if spec.mode == "unstructured":
        threshold = _global_threshold([c for c, _ in costs.values()], target)
        for name, (c, _) in costs.items():
            new_masks[name] = c <= threshold
    else:
        group = {}
        for name, (c, _) in costs.items():
            if c.shape[1] % spec.m:
                raise ValueError(f"surgeon.m: {name} has {c.shape[1]} inputs, not a multiple of {spec.m}")
            group[name] = kfac.nm_costs(c, spec.n, spec.m)
        # Fraction of groups to prune now: target / (n/m); already pruned groups cost 0 and come first.
        fraction = target / (spec.n / spec.m)
        threshold = _global_threshold([g for g, _ in group.values()], fraction)
        for name, (g, mask) in group.items():
            chosen = (g <= threshold).repeat_interleave(spec.m, dim=1)
            new_masks[name] = mask & chosen
    for name, layer in layers.items():
        mask = new_masks[name]
        w = layer.weight.detach().double()
        if spec.obd or spec.magnitude:
            w = w.masked_fill(mask, 0.0)
        else:
            fresh = mask & ~masks[name] if name in masks else mask
            f = costs[name][1].to(w.device)
            w = kfac.remove_elements(w, f, fresh, spec.max_correlate)
            w[mask] = 0.0
        with torch.no_grad():
            layer.weight.copy_(w.to(layer.weight.dtype))
        masks[name] = mask


def _schur_inverse(a_inv: torch.Tensor) -> torch.Tensor:
    """Inverse of A without its last row/column, from the inverse of A (the bias input held fixed)."""
    return a_inv[:-1, :-1] - torch.outer(a_inv[:-1, -1], a_inv[-1, :-1]) / a_inv[-1, -1]


def _global_threshold(costs: Sequence[torch.Tensor], fraction: float) -> float:
    """The cost below which ``fraction`` of all entries lie (one threshold across layers)."""
    flat = torch.cat([c.flatten().double().cpu() for c in costs])  # the costs own precision: no ties from rounding
    k = int(round(fraction * len(flat)))
    if k <= 0:
        return -math.inf
    return float(flat.kthvalue(min(k, len(flat))).values)


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


def to_semi_structured(model: PreTrainedModel, n: int = 2, m: int = 4) -> int:
    """Swap the weights of every decoder linear that is n:m sparse for PyTorch's semi-structured sparse tensor, so its
    2:4 kernels run them (CUDA, float16/bfloat16, for inference). Returns how many linears were swapped."""
    from torch.sparse import to_sparse_semi_structured

    swapped = 0
    for layer in linears(model).values():
        w = layer.weight.detach()
        if w.shape[1] % m == 0 and bool(((w.view(w.shape[0], -1, m) == 0).sum(-1) >= n).all()):
            layer.weight = nn.Parameter(to_sparse_semi_structured(w), requires_grad=False)
            swapped += 1
    return swapped
