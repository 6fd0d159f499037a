"""LayerChop: delete whole decoder layers by a named rule (Just CHOP, arXiv 2305.14864; ShortGPT's Block Influence).

Each strategy is a small function in ``STRATEGIES`` mapping (number of layers, number to remove) to the sorted
indices to remove. The chopped model stays a normal Hugging Face model: its config, per-layer config lists and
attention ``layer_idx`` are updated, so ``save_pretrained``/``from_pretrained`` and KV-cache generation work.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from chop.models.registry import architecture, decoder_layers, num_layers


def remove_input(n_layers: int, n: int, **_: Any) -> list[int]:
    """The n layers right after the first (Just CHOP's choice for 1.1B and Llama-2-7B)."""
    return list(range(1, 1 + n))


def remove_output(n_layers: int, n: int, **_: Any) -> list[int]:
    """The n layers right before the last."""
    return list(range(n_layers - 1 - n, n_layers - 1))


def remove_middle(n_layers: int, n: int, **_: Any) -> list[int]:
    """A contiguous block of n layers centred in the stack."""
    start = max(1, (n_layers - n) // 2)
    return list(range(start, start + n))


def remove_both(n_layers: int, n: int, **_: Any) -> list[int]:
    """ceil(n/2) layers after the first and floor(n/2) before the last."""
    head = (n + 1) // 2
    return sorted(remove_input(n_layers, head) + (remove_output(n_layers, n - head) if n - head else []))


def remove_max_gap(n_layers: int, n: int, **_: Any) -> list[int]:
    """n layers spread evenly over the inner layers, so that removed layers are as far apart as possible."""
    inner = n_layers - 2
    return sorted({1 + math.floor((i + 0.5) * inner / n) for i in range(n)})


def remove_top(n_layers: int, n: int, **_: Any) -> list[int]:
    """Keep the bottom layers (nearest the input): remove the top n ("Why Lift so Heavy?")."""
    return list(range(n_layers - n, n_layers))


def remove_bottom(n_layers: int, n: int, **_: Any) -> list[int]:
    """Keep the top layers (nearest the output): remove the bottom n."""
    return list(range(n))


def remove_indices(n_layers: int, n: int, indices: Optional[list[int]] = None, **_: Any) -> list[int]:
    """Exactly the layers listed in ``indices``."""
    return sorted(indices or [])


def remove_lowest_influence(n_layers: int, n: int, scores: Optional[list[float]] = None, **_: Any) -> list[int]:
    """The n layers with the lowest Block Influence (ShortGPT), ties broken by index."""
    if scores is None or len(scores) != n_layers:
        raise ValueError("chop: block_influence needs one score per layer (calibration data)")
    return sorted(sorted(range(n_layers), key=lambda i: (scores[i], i))[:n])


def remove_angular_block(n_layers: int, n: int, scores: Optional[list[float]] = None, **_: Any) -> list[int]:
    """The n consecutive layers whose input and output are nearest in angle (Gromov et al., arXiv 2403.17887):
    ``scores[l]`` is the distance across layers l..l+n-1, the block with the smallest is removed."""
    if scores is None or len(scores) != n_layers - n + 1:
        raise ValueError("chop: angular_block needs one distance per block of n layers (calibration data)")
    start = min(range(len(scores)), key=lambda i: (scores[i], i))
    return list(range(start, start + n))


STRATEGIES: dict[str, Callable[..., list[int]]] = {
    "input": remove_input,
    "output": remove_output,
    "middle": remove_middle,
    "both": remove_both,
    "max_gap": remove_max_gap,
    "top": remove_top,
    "bottom": remove_bottom,
    "indices": remove_indices,
    "block_influence": remove_lowest_influence,
    "angular_block": remove_angular_block,
}


KEEPS_ENDS = {"input", "output", "middle", "both", "max_gap"}  # Just CHOP's placements never remove the first/last layer
SCORED = {"block_influence", "angular_block"}  # the strategies that score layers on calibration text


@dataclass
class LayerChop:
    """Which layers to delete. Give exactly one target: ``n_remove``, ``n_keep`` or ``fraction`` (of layers removed);
    the ``indices`` strategy takes its target from ``indices`` (the layers to remove)."""

    strategy: str = "input"
    n_remove: Optional[int] = None
    n_keep: Optional[int] = None
    fraction: Optional[float] = None
    indices: Optional[list[int]] = None
    angular: bool = False  # block_influence: angular distance arccos(cos)/pi instead of 1 - cos
    calibration_batches: int = 8  # block_influence, angular_block: batches of training text to score layers on

    @property
    def needs_calibration(self) -> bool:
        return self.strategy in SCORED

    def n_to_remove(self, n_layers: int) -> int:
        """Validate the target against a model of ``n_layers`` layers (no weights needed) and resolve it."""
        if self.strategy not in STRATEGIES:
            raise ValueError(f"chop.strategy: unknown '{self.strategy}'; choose one of {sorted(STRATEGIES)}")
        if self.strategy == "indices":
            if self.n_remove is not None or self.n_keep is not None or self.fraction is not None:
                raise ValueError("chop: the 'indices' strategy takes its target from chop.indices; drop n_remove/n_keep/fraction")
            idx = self.indices or []
            if not idx:
                raise ValueError("chop.indices: list the layers to remove, e.g. [3, 4, 5]")
            bad = [i for i in idx if not 0 <= i < n_layers]
            if bad:
                raise ValueError(f"chop.indices: {bad} out of range for a model of {n_layers} layers (0..{n_layers - 1})")
            if len(set(idx)) != len(idx):
                raise ValueError(f"chop.indices: duplicates in {idx}")
            n = len(idx)
        else:
            if self.indices is not None:
                raise ValueError(f"chop.indices is only for strategy 'indices', not '{self.strategy}'")
            given = {k: v for k, v in (("n_remove", self.n_remove), ("n_keep", self.n_keep), ("fraction", self.fraction)) if v is not None}
            if len(given) != 1:
                raise ValueError(f"chop: give exactly one of n_remove, n_keep, fraction (got {sorted(given) or 'none'})")
            if self.fraction is not None:
                if not 0 < self.fraction < 1:
                    raise ValueError(f"chop.fraction: {self.fraction} must be in (0, 1)")
                n = round(self.fraction * n_layers)
            elif self.n_keep is not None:
                n = n_layers - self.n_keep
            else:
                n = self.n_remove
        if not 1 <= n <= n_layers - 1:
            raise ValueError(f"chop: removing {n} of {n_layers} layers is not allowed (at least 1 removed and 1 kept)")
        if self.strategy in KEEPS_ENDS and n > n_layers - 2:
            raise ValueError(f"chop: strategy '{self.strategy}' keeps the first and last layer, so it can remove at most "
                             f"{n_layers - 2} of {n_layers} layers, not {n}")
        return n

    def removed(self, n_layers: int, scores: Optional[list[float]] = None) -> list[int]:
        n = self.n_to_remove(n_layers)
        return STRATEGIES[self.strategy](n_layers, n, indices=self.indices, scores=scores)


@dataclass
class ChopPlan:
    """What a chop did: written beside each checkpoint as ``chop_plan.json`` and kept in the model config."""

    strategy: str
    num_layers_before: int
    kept: list[int]
    removed: list[int]
    params_before: int = 0
    params_after: int = 0
    scores: Optional[list[float]] = field(default=None)

    def to_dict(self) -> dict:
        return asdict(self)


def _per_layer_fields(config: PretrainedConfig, n_layers: int) -> list[str]:
    return [k for k, v in vars(config).items() if isinstance(v, list) and len(v) == n_layers and k != "chop_plan"]


def apply_chop(model: PreTrainedModel, kept: Iterable[int]) -> PreTrainedModel:
    """Keep only layers ``kept`` (original indices, in order), in place; renumber and update the config."""
    layers = decoder_layers(model)
    config = model.config.get_text_config()
    n_layers = len(layers)
    kept = sorted(kept)
    if not kept or kept[0] < 0 or kept[-1] >= n_layers or len(set(kept)) != len(kept):
        raise ValueError(f"chop: kept layers {kept} invalid for a model of {n_layers} layers")
    new = nn.ModuleList([layers[i] for i in kept])
    for new_idx, layer in enumerate(new):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    parent_path, _, attr = architecture(model.config).layers.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, attr, new)
    for name in _per_layer_fields(config, n_layers):
        setattr(config, name, [getattr(config, name)[i] for i in kept])
    _keep_layer_kinds(config, kept)
    config.num_hidden_layers = len(kept)
    _check_config_describes(model)
    return model


def _keep_layer_kinds(config: PretrainedConfig, kept: list[int]) -> None:
    """Rewrite config fields that give layer kinds by index (not as per-layer lists), so that each kept layer keeps
    its kind under its new index: Qwen2/3-MoE's ``mlp_only_layers``/``decoder_sparse_step`` and DeepSeek's
    ``first_k_dense_replace``."""
    if hasattr(config, "mlp_only_layers") and hasattr(config, "decoder_sparse_step"):
        step, dense = config.decoder_sparse_step or 1, set(config.mlp_only_layers or [])
        sparse = [i not in dense and getattr(config, "num_experts", 0) > 0 and (i + 1) % step == 0 for i in kept]
        config.decoder_sparse_step = 1
        config.mlp_only_layers = [j for j, s in enumerate(sparse) if not s]
    if getattr(config, "first_k_dense_replace", None) is not None and getattr(config, "moe_layer_freq", 1) == 1:
        config.first_k_dense_replace = sum(i < config.first_k_dense_replace for i in kept)  # kept in order: a prefix


def _check_config_describes(model: PreTrainedModel) -> None:
    """Refuse a chop whose config would rebuild another architecture (a layer kind given by index that
    ``_keep_layer_kinds`` does not know): ``from_pretrained`` would load such a model with random layers."""
    from chop.models.loading import from_config

    with torch.device("meta"):
        fresh = from_config(model.config)
    want = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if want != have:
        diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
        raise NotImplementedError(
            f"chop: after the chop, {model.config.model_type}'s config no longer describes the model ({len(diff)} "
            f"weights differ, e.g. {diff[:3]}): a config field gives layer kinds by index. Teach "
            f"chop.pruning.layerchop._keep_layer_kinds that field, or keep those layers")


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def block_influence(model: PreTrainedModel, batches: Iterable[torch.Tensor], angular: bool = False) -> list[float]:
    """ShortGPT's Block Influence per layer: 1 - mean cos(h_in, h_out) over all calibration tokens."""
    layers = decoder_layers(model)
    sums = torch.zeros(len(layers), dtype=torch.float64)

    def hook(i: int):
        def fn(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, (tuple, list)) else output
            cos = torch.nn.functional.cosine_similarity(h_in.double(), h_out.double(), dim=-1).clamp(-1, 1)
            dist = torch.arccos(cos) / math.pi if angular else 1 - cos
            sums[i] += dist.sum().cpu()

        return fn

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    return (sums / _run_hooked(model, batches, handles, "block_influence")).tolist()


def _run_hooked(model: PreTrainedModel, batches: Iterable[torch.Tensor], handles: list, name: str,
                after_batch: Optional[Callable[[], None]] = None) -> int:
    """Run ``batches`` through ``model`` (eval mode, no gradients) with the hooks ``handles`` installed, removed
    after; ``after_batch()`` after each batch. Returns the number of tokens seen."""
    was_training, count = model.training, 0
    model.eval()
    try:
        with torch.no_grad():
            for input_ids in batches:
                model(input_ids=input_ids.to(next(model.parameters()).device), use_cache=False)
                count += input_ids.numel()
                if after_batch is not None:
                    after_batch()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if count == 0:
        raise ValueError(f"chop: {name} got no calibration tokens")
    return count


def angular_block_distances(model: PreTrainedModel, batches: Iterable[torch.Tensor], n: int) -> list[float]:
    """For each block of ``n`` consecutive layers starting at l: mean arccos(cos(h_l, h_{l+n}))/pi over all calibration
    tokens, h_l the input of layer l and h_L the last layer's output (Gromov et al. use the last token alone)."""
    layers = decoder_layers(model)
    n_layers = len(layers)
    sums = torch.zeros(n_layers - n + 1, dtype=torch.float64)
    states: list = [None] * (n_layers + 1)

    def keep_input(i: int):
        def fn(module: nn.Module, args: tuple, kwargs: dict) -> None:
            states[i] = args[0] if args else kwargs["hidden_states"]

        return fn

    def keep_output(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        states[n_layers] = output[0] if isinstance(output, (tuple, list)) else output

    def accumulate() -> None:
        for start in range(n_layers - n + 1):
            cos = torch.nn.functional.cosine_similarity(states[start].double(), states[start + n].double(),
                                                        dim=-1).clamp(-1, 1)
            sums[start] += (torch.arccos(cos) / math.pi).sum().cpu()
        states[:] = [None] * (n_layers + 1)

    handles = [layer.register_forward_pre_hook(keep_input(i), with_kwargs=True) for i, layer in enumerate(layers)]
    handles.append(layers[-1].register_forward_hook(keep_output, with_kwargs=True))
    return (sums / _run_hooked(model, batches, handles, "angular_block", accumulate)).tolist()


def chop(model: PreTrainedModel, spec: LayerChop, calibration: Optional[Iterable[torch.Tensor]] = None) -> ChopPlan:
    """Chop ``model`` in place by ``spec`` and return the plan."""
    architecture(model.config)  # an unsupported model is named before its target is judged
    n_layers = num_layers(model.config)
    n = spec.n_to_remove(n_layers)
    scores = None
    if spec.needs_calibration and calibration is None:
        raise ValueError(f"chop: strategy {spec.strategy} needs calibration batches")
    if spec.strategy == "block_influence":
        scores = block_influence(model, calibration, angular=spec.angular)
    elif spec.strategy == "angular_block":
        scores = angular_block_distances(model, calibration, n)
    removed = spec.removed(n_layers, scores=scores)
    kept = [i for i in range(n_layers) if i not in set(removed)]
    before = num_params(model)
    apply_chop(model, kept)
    plan = ChopPlan(spec.strategy, n_layers, kept, removed, before, num_params(model), scores)
    model.config.chop_plan = {k: v for k, v in plan.to_dict().items() if k != "scores"}
    return plan
