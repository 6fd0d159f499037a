"""LLM Surgeon (arXiv 2312.17244) and its K-OBD baseline: prune structures (MLP units and attention groups), n:m
blocks or single weights of a model's decoder linears by Kronecker-factored curvature (``kfac.py``), with correlated
updates of the remaining weights (Surgeon), over several shots with one threshold across layers.

A structure's cost is the sum of its parts' K-FAC costs (each the loss increase of removing that row or column at its
optimal update), as the paper defines it; the update itself goes to the consuming linear's columns (o, down), and with
``update_rows`` also to the producing linears' rows (q/k/v, up/gate).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, Optional

import torch

from chop.models.registry import architecture, decoder_layers
from chop.pruning import kfac, lora, shots
from chop.pruning.elements import global_threshold, nm_costs
from chop.pruning.pruner import Mode, Pruner, Report
from chop.pruning.structures import choose, linears, removed_parts

log = logging.getLogger(__name__)


@dataclass
class Sparsity(Pruner):
    """What to remove and how much, for the methods that score by curvature or magnitude.

    Args:
        method: the pruning method (``chop.pruning.registry.PRUNERS``).
        mode: structured (MLP units and attention groups, sliced out: a smaller model), semistructured (n:m) or
            unstructured.
        sparsity: the fraction of the decoder linears' weights to remove (semistructured: n/m, fixed).
        n, m: semistructured: n zeros in every m consecutive weights of a row (2:4).
        align: structured: every layer keeps a multiple of this many MLP units, so the sliced matrices stay fast on
            GPUs (an odd width, e.g. 3,943, runs a bf16 matmul ~6x slower than 3,944 on an H100); 1: exact target.
        uniform: structured: every layer keeps the same widths, so the pruned model has a standard config that any
            Hugging Face tool loads (otherwise each layer keeps what the one threshold leaves it).
    """

    method: str = "surgeon"
    mode: Mode = "structured"
    sparsity: float = 0.3
    n: int = 2
    m: int = 4
    align: int = 8
    uniform: bool = False

    def check(self, config) -> None:
        super().check(config)
        if self.uniform and self.mode != "structured":
            raise ValueError(f"pruning.uniform: only structured pruning has widths to keep uniform ({self.mode} keeps "
                             f"every matrix's shape); set it to false")

    def prune(self, model, batches, evaluate=None, on_shot=None) -> Report:
        return shots.run(model, self, lambda state, target, t: self.shot(state, target, t, batches), evaluate, on_shot)

    # One shot: the costs under this method's curvature, the cheapest removed, the rest updated (Surgeon) or not.
    diagonal = True  # costs from the curvature's diagonal and no updates (K-OBD, magnitude)

    def shot(self, state: shots.State, target: float, t: int, batches: Sequence[torch.Tensor]) -> Optional[dict]:
        if self.mode == "structured":
            structured_shot(state, self.curvature(state, batches), target * state.total, self)
        else:
            element_shot(state, next(self.curvature(state, batches)), target, self)
        return None

    def curvature(self, state: shots.State, batches: Sequence[torch.Tensor]) -> Iterator[dict[str, kfac.Factors]]:
        raise NotImplementedError


@dataclass
class Curvature(Sparsity):
    """Settings of the methods that gather K-FAC curvature on calibration text.

    Args:
        shots: prune in this many steps, shot t to t·sparsity/shots, re-estimating the curvature each time.
        calibration_samples: calibration sequences (of the model's context length, or ``seq_len``).
        seq_len: calibration sequence length (default: the model's context length).
        batch_size: calibration sequences per forward/backward pass.
        fisher_samples: 0: the empirical Fisher (the data's next tokens); k: k label draws from the model.
        factors_device: where the curvature factors accumulate (``cpu`` saves GPU memory).
        blocks_per_pass: structured: > 0 gathers the curvature of this many decoder blocks at a time (a forward and
            backward pass over the calibration data each), keeping only their costs and the inverses the updates
            need, so the factors of one group of blocks are resident instead of all (0: all blocks in one pass).
    """

    shots: int = 5
    calibration_samples: int = 128
    seq_len: Optional[int] = None
    batch_size: int = 4
    fisher_samples: int = 0
    factors_device: Optional[str] = None
    blocks_per_pass: int = 0

    def check(self, config) -> None:
        super().check(config)
        if self.blocks_per_pass < 0:
            raise ValueError(f"pruning.blocks_per_pass: {self.blocks_per_pass} must be >= 0 (0: all blocks at once)")
        if self.blocks_per_pass and self.mode != "structured":
            raise ValueError(f"pruning.blocks_per_pass: only structured pruning gathers the curvature block by block "
                             f"({self.mode} updates need every layer's inverses at once); set it to 0")

    def prune(self, model, batches, evaluate=None, on_shot=None) -> Report:
        free = free_gpu_bytes(model)
        if free is not None and self.factors_device is None:  # before the first pass over the calibration data
            check_curvature_fits(model, self, free)
        return super().prune(model, batches, evaluate, on_shot)

    def curvature(self, state: shots.State, batches: Sequence[torch.Tensor]) -> Iterator[dict[str, kfac.Factors]]:
        """The layers' factors (inverted, unless the method needs none): all in one pass, or ``blocks_per_pass``
        decoder blocks' at a time, each group from its own pass over the unchanged model."""
        model, layers = state.model, state.layers
        device = torch.device(self.factors_device) if self.factors_device else None
        n = len(decoder_layers(model))
        step = self.blocks_per_pass or n
        prefix = architecture(model.config).layers
        for start in range(0, n, step):
            began, end = time.perf_counter(), min(n, start + step)
            blocks = tuple(f"{prefix}.{i}." for i in range(start, end))
            factors = kfac.collect(model, {k: v for k, v in layers.items() if k.startswith(blocks)}, batches,
                                   self.fisher_samples, device)
            if not self.diagonal:
                for f in factors.values():
                    f.invert(self.damping_a, self.damping_g)
            if step < n:  # a large model's shot takes minutes: say how far it is
                if next(model.parameters()).is_cuda:
                    torch.cuda.synchronize()  # the pass's own time, not its kernels' launch
                log.info("curvature of blocks %d-%d of %d: %.1f s", start, end - 1, n, time.perf_counter() - began)
            yield factors
            del factors


def free_gpu_bytes(model) -> Optional[int]:
    """Free memory of the GPU the model is on; None for a model on the CPU."""
    device = next(model.parameters()).device
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None


def curvature_bytes(model, blocks_per_pass: int, keeps_inverses: bool) -> tuple[int, int]:
    """About the GPU memory K-FAC needs beside the model, in bytes: one pass's float64 factors at their largest (twice:
    the sums and the factors, or the factors and their inverses, plus two temporaries of the largest while inverting
    it), and the consuming linears' input inverses that a structured Surgeon shot keeps for its updates on the GPU
    (block by block they wait in host memory instead: ``structured_shot``)."""
    arch = architecture(model.config)
    sizes, n = {name: kfac.factor_sizes(l) for name, l in linears(model).items()}, len(decoder_layers(model))
    block = [sum(a * a + g * g for name, (a, g) in sizes.items() if name.startswith(f"{arch.layers}.{i}."))
             for i in range(n)]
    step = blocks_per_pass or n
    largest = max(max(pair) for pair in sizes.values()) ** 2
    per_pass = 8 * (2 * max(sum(block[s:s + step]) for s in range(0, n, step)) + 2 * largest)
    consumers = (f".{arch.attention[3]}", f".{arch.mlp_out}")
    kept = sum(a * a for name, (a, _) in sizes.items() if name.endswith(consumers))
    return per_pass, 8 * kept if keeps_inverses and not blocks_per_pass else 0


def check_curvature_fits(model, spec: "Curvature", free: int) -> None:
    """Refuse, before the first pass over the calibration data, curvature whose factors cannot fit in ``free`` bytes of
    GPU memory, naming the ``blocks_per_pass`` that would (a calibration batch's activations come on top)."""
    keeps = spec.mode == "structured" and not spec.diagonal
    per_pass, kept = curvature_bytes(model, spec.blocks_per_pass, keeps)
    if per_pass + kept <= free:
        return
    gib, n = 2**30, len(decoder_layers(model))
    fitting = [k for k in range(1, n + 1) if sum(curvature_bytes(model, k, keeps)) <= free]
    what = f"{spec.blocks_per_pass} decoder blocks at a time" if spec.blocks_per_pass else "all decoder blocks at once"
    hint = (f"set pruning.blocks_per_pass to {max(fitting)} or fewer" if fitting and spec.mode == "structured" else
            "prune on a GPU with more memory, or set pruning.factors_device: cpu (slower)")
    field = "pruning.blocks_per_pass" if spec.mode == "structured" else "pruning.factors_device"
    raise ValueError(f"{field}: the curvature of {what} needs about {per_pass / gib:.0f} GiB of "
                     f"float64 factors" + (f", plus {kept / gib:.0f} GiB of inverses kept for the updates" if kept else "")
                     + f"; {free / gib:.0f} GiB of the GPU are free beside the model. {hint[0].upper() + hint[1:]} "
                     f"(a calibration batch's activations come on top)")


@dataclass
class KOBD(Curvature):
    """K-OBD, LLM Surgeon's baseline: costs from the diagonal of the Kronecker-factored curvature, no weight updates."""

    method: Literal["obd"] = "obd"


@dataclass
class LoRA:
    """First-order updates after each shot: rank-``rank`` adapters on every decoder linear, trained by the LM loss on
    calibration batches with pruned entries masked, then merged.

    Args:
        rank: the adapters' rank.
        lr: their learning rate (AdamW, one step per batch).
        fraction: the share of the calibration batches each shot but the last trains on (a different share each shot).
        final: the share after the last shot (the paper's longer final pass).
    """

    rank: int = 16
    lr: float = 1e-4
    fraction: float = 0.1
    final: float = 1.0


@dataclass
class Surgeon(Curvature):
    """LLM Surgeon (the paper's defaults: 40 shots to 50%, 128 calibration sequences, damping 0.01).

    Args:
        damping_a, damping_g: λ·mean(diag) added to each Kronecker factor before inverting.
        max_correlate: unstructured/semistructured: weights whose updates are solved jointly, per chunk.
        update_rows: structured: also give the linears whose rows are removed (q/k/v, up/gate) the correlated row
            update. Off by default: a removed unit's outputs feed only the columns removed with it, so the column
            update of the consuming linear (o, down) is the compensation; updating both compensates twice.
        structure_cost: structured: ``all_parts``: the paper's sum of every part's compensated cost, the producing
            rows' included although (without ``update_rows``) they are only zeroed; ``updated``: only what the update
            touches (the consuming columns; with ``update_rows`` also the rows). Measured on SmolLM2 at 20%
            (``benchmarks/results/surgeon_quality_h200.json``): all_parts 31.29, updated 32.04 held-out perplexity,
            so the rows' costs, a measure of how much the unit's output matters, are kept in the choice.
        lora: first-order updates after each shot (none if unset).
    """

    method: Literal["surgeon"] = "surgeon"
    damping_a: float = 0.01
    damping_g: float = 0.01
    max_correlate: int = 2048
    update_rows: bool = False
    structure_cost: Literal["all_parts", "updated"] = "all_parts"
    lora: Optional[LoRA] = None

    diagonal = False

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):  # Python callers may pass plain dicts
            self.lora = LoRA(**self.lora)

    def check(self, config) -> None:
        super().check(config)
        if self.damping_a < 0 or self.damping_g < 0:
            raise ValueError("pruning.damping_a/damping_g must be >= 0")
        if self.lora is not None:
            if self.lora.rank < 1 or self.lora.lr <= 0:
                raise ValueError(f"pruning.lora.rank ({self.lora.rank}) must be >= 1 and pruning.lora.lr "
                                 f"({self.lora.lr}) > 0 (no updates: leave pruning.lora unset)")
            for name in ("fraction", "final"):
                if not 0 < getattr(self.lora, name) <= 1:
                    raise ValueError(f"pruning.lora.{name}: {getattr(self.lora, name)} must be in (0, 1], a share of "
                                     f"the calibration batches")

    def shot(self, state: shots.State, target: float, t: int, batches: Sequence[torch.Tensor]) -> Optional[dict]:
        super().shot(state, target, t, batches)
        if self.lora is None:
            return None
        share = _share(batches, self.lora.final if t == self.shots else self.lora.fraction, t)
        return {"lora_loss": lora.train(state.model, state.layers, _kept(state), share, self.lora.rank, self.lora.lr)}


def _share(batches: Sequence[torch.Tensor], fraction: float, shot: int) -> list[torch.Tensor]:
    """``fraction`` of the batches, a different run of them each shot (wrapping around)."""
    k = max(1, round(fraction * len(batches)))
    return [batches[((shot - 1) * k + i) % len(batches)] for i in range(k)]


def _kept(state: shots.State) -> dict[str, lora.Keep]:
    """What each linear keeps, for the adapters: removed rows and columns (structured) or weights (masks) are 0."""
    layers = state.layers
    if state.masks:
        return {name: (~state.masks[name]).float() for name in layers}
    keep = {name: (torch.ones(l.out_features, device=l.weight.device), torch.ones(l.in_features, device=l.weight.device))
            for name, l in layers.items()}
    for p in removed_parts(state.groups):
        keep[p.name][p.axis][p.index] = 0.0
    return keep


# -- a structured shot ---------------------------------------------------------------------------------------------
def structured_shot(state: shots.State, passes: Iterable[dict[str, kfac.Factors]], budget: float, spec: Sparsity) -> None:
    """Remove the cheapest structures until ``budget`` parameters are gone (``structures.choose``), then give each
    consuming linear the correlated update for all its removed columns (and, with ``update_rows``, each producing
    linear the update for its rows). ``passes`` yields the factors of some of the layers at a time; only the costs and
    the inverses the updates need are kept, in host memory when the passes are block by block (``blocks_per_pass``:
    they would otherwise grow on the GPU with every pass, by 1 GiB a block at Llama-2-7B's shape)."""
    layers, groups = state.layers, state.groups
    diagonal = spec.diagonal
    update_rows = getattr(spec, "update_rows", False)
    row_cost, col_cost = (kfac.row_costs_obd, kfac.column_costs_obd) if diagonal else (kfac.row_costs, kfac.column_costs)
    consumers = {p.name for s in groups for p in s.parts if p.axis == 1}
    parts: dict[tuple[str, int], list[float]] = {}  # plain lists: many small index sums, no device round trip each
    kept: dict[str, kfac.Factors] = {}
    park = torch.device("cpu") if getattr(spec, "blocks_per_pass", 0) else None
    for factors in passes:
        while factors:  # each layer's factors freed once its costs are out
            name, f = factors.popitem()
            w = kfac.weight_matrix(layers[name])  # float64 copies one at a time, not the whole model's at once
            parts[name, 0] = row_cost(w, f.to(w.device)).tolist()
            parts[name, 1] = col_cost(w, f.to(w.device))[:layers[name].in_features].tolist()
            if not diagonal:
                keep = kfac.Factors(None, None, f.A_inv if name in consumers else None,
                                    f.G_inv if update_rows and name not in consumers else None)
                kept[name] = keep.to(park) if park is not None else keep
    # Which parts a structure's cost adds: all (K-OBD, magnitude, the paper's Surgeon), or those the update touches.
    counted = (lambda p: True) if diagonal or update_rows or spec.structure_cost == "all_parts" else (lambda p: p.axis == 1)
    cost = [sum(sum(parts[p.name, p.axis][i] for i in p.index) for p in s.parts if counted(p)) for s in groups]
    choose(groups, cost, budget, spec.align, spec.uniform)
    gone: dict[tuple[str, int], list[int]] = {}
    for p in removed_parts(groups):
        gone.setdefault((p.name, p.axis), []).extend(p.index)
    for (name, axis), index in gone.items():
        w, f = kfac.weight_matrix(layers[name]), kept.get(name)
        f = f.to(w.device) if f is not None else None
        idx = torch.tensor(sorted(index), device=w.device)
        if not diagonal and axis == 1:
            w = kfac.remove_columns(w, f, idx)
        elif not diagonal and update_rows:
            w = kfac.remove_rows(w, f, idx)
        else:  # baselines; or removed rows, whose outputs feed only the columns removed with them: just zeros
            w = w.clone()
            if axis == 0:
                w[idx] = 0.0
            else:
                w[:, idx] = 0.0
        kfac.set_weight_matrix(layers[name], w.to(layers[name].weight.dtype))


# -- an unstructured or n:m shot -----------------------------------------------------------------------------------
def element_shot(state: shots.State, factors: dict[str, kfac.Factors], target: float, spec: Sparsity) -> None:
    """Unstructured: one threshold over all layers' element costs; semistructured: the cheapest n:m groups until
    ``target`` of the weights are zero. Removed weights stay removed (cost 0)."""
    layers, masks = state.layers, state.masks
    costs = {}
    for name, layer in layers.items():
        w = layer.weight.detach().double()
        f = factors[name]
        if layer.bias is not None:  # the bias is not pruned: its row/column of the factors drops out
            f = kfac.Factors(f.A[:-1] if f.A.dim() == 1 else f.A[:-1, :-1], f.G,
                             None if f.A_inv is None else _schur_inverse(f.A_inv), f.G_inv)
        c = (kfac.element_costs_obd if spec.diagonal else kfac.element_costs)(w, f.to(w.device))
        if name in masks:
            c[masks[name]] = 0.0
        costs[name] = (c, f)
    new_masks = {}
    if spec.mode == "unstructured":
        threshold = global_threshold([c for c, _ in costs.values()], target)
        for name, (c, _) in costs.items():
            new_masks[name] = c <= threshold
    else:
        group = {name: nm_costs(c, spec.n, spec.m) for name, (c, _) in costs.items()}
        # Fraction of groups to prune now: target / (n/m); already pruned groups cost 0 and come first.
        threshold = global_threshold([g for g, _ in group.values()], target / (spec.n / spec.m))
        for name, (g, mask) in group.items():
            new_masks[name] = mask & (g <= threshold).repeat_interleave(spec.m, dim=1)
    for name, layer in layers.items():
        mask = new_masks[name]
        w = layer.weight.detach().double()
        if spec.diagonal:
            w = w.masked_fill(mask, 0.0)
        else:
            fresh = mask & ~masks[name] if name in masks else mask
            w = kfac.remove_elements(w, costs[name][1].to(w.device), fresh, spec.max_correlate)
            w[mask] = 0.0
        with torch.no_grad():
            layer.weight.copy_(w.to(layer.weight.dtype))
        masks[name] = mask


def _schur_inverse(a_inv: torch.Tensor) -> torch.Tensor:
    """Inverse of A without its last row/column, from the inverse of A (the bias input held fixed)."""
    return a_inv[:-1, :-1] - torch.outer(a_inv[:-1, -1], a_inv[-1, :-1]) / a_inv[-1, -1]
