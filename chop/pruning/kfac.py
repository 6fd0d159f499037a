"""Kronecker-factored curvature of the loss for the linear layers of a model (K-FAC), and LLM Surgeon's costs and
weight updates under it (arXiv 2312.17244).

For a linear layer ``y = W a`` (W: out x in) the Fisher of its weights is approximated by ``G ⊗ A`` with
``A = E[a aᵀ]`` over its inputs (plus a constant 1 when the layer has a bias, so the bias is the last column of W)
and ``G = E[g gᵀ]`` over the gradients of the loss with respect to its outputs. The factors, their inverses, costs and
updates are float64.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from chop.pruning import ranks


@dataclass
class Factors:
    """One layer's Kronecker factors and their damped inverses."""

    A: torch.Tensor
    G: torch.Tensor
    A_inv: Optional[torch.Tensor] = None
    G_inv: Optional[torch.Tensor] = None

    def to(self, device: torch.device) -> "Factors":
        """The factors on ``device`` (those gathered on the host, ``factors_device: cpu``, meet each layer's weights
        on its GPU one layer at a time)."""
        return Factors(*(t.to(device) if t is not None else None for t in (self.A, self.G, self.A_inv, self.G_inv)))

    def invert(self, damp_a: float, damp_g: float) -> "Factors":
        """Damped inverses: λ·mean(diag) added to each factor's diagonal."""
        self.A_inv = _damped_inverse(self.A, damp_a)
        self.G_inv = _damped_inverse(self.G, damp_g)
        return self


def _damped_inverse(m: torch.Tensor, damp: float) -> torch.Tensor:
    m = m.double()
    m = m + damp * m.diagonal().mean() * torch.eye(len(m), dtype=m.dtype, device=m.device)
    return torch.linalg.inv(m)


def _moment(x: torch.Tensor, device: Optional[torch.device]) -> torch.Tensor:
    """xᵀx over every position of ``x`` (..., features) on ``device`` (None: x's), returned in float64, in which the
    batches' moments are summed. A bf16 or float16 x on a GPU is multiplied as it is, on the tensor cores, into
    float32: its products are exact in float32, so the result is the float32 product's but for the order of the
    additions, at many times the speed (float32 products run on the CUDA cores). Otherwise in float32 (float64 for a
    float64 model)."""
    x = x.detach().flatten(0, -2)
    x = x.to(device) if device is not None else x
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(x.T, x, out_dtype=torch.float32).double()
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    return (x.T @ x).double()


def factor_sizes(layer: nn.Linear) -> tuple[int, int]:
    """The sizes of a linear's two factors: A over its input (with a column of ones for the bias), G over its output."""
    return layer.in_features + (layer.bias is not None), layer.out_features


def weight_matrix(layer: nn.Linear) -> torch.Tensor:
    """The layer's weights in float64, with the bias as an extra last column."""
    w = layer.weight.detach().double()
    return torch.cat([w, layer.bias.detach().double()[:, None]], 1) if layer.bias is not None else w


def set_weight_matrix(layer: nn.Linear, w: torch.Tensor) -> None:
    with torch.no_grad():
        if layer.bias is not None:
            layer.bias.copy_(w[:, -1])
            w = w[:, :-1]
        layer.weight.copy_(w)


def collect(model: nn.Module, layers: dict[str, nn.Linear], batches: Iterable[torch.Tensor],
            fisher_samples: int = 0, device: Optional[torch.device] = None) -> dict[str, Factors]:
    """K-FAC factors of ``layers`` over calibration ``batches`` of token ids.

    Labels: the data's next tokens (the empirical Fisher) or, with ``fisher_samples`` > 0, that many draws from the
    model's own predictive distribution per batch. ``device``: where the factors accumulate (e.g. CPU to save GPU
    memory). Under data parallelism each rank takes every world-th batch and the sums are added over ranks, so every
    rank returns the factors of all ``batches``.
    """
    sums: dict[str, list] = {name: [None, None] for name in layers}
    count = [0]
    # The last input (held, so that no other tensor can take its place), whether a ones column was added, its version
    # (in-place writes bump it) and its moment: q, k and v read the same tensor, as do gate and up, and their A is
    # computed once (about a tenth of the hooks' work).
    last: list = [None, None, None, None]

    def accumulate(name: str, i: int, moment: torch.Tensor) -> None:
        sums[name][i] = moment.clone() if sums[name][i] is None else sums[name][i].add_(moment)

    def forward_hook(name: str):
        def fn(module: nn.Linear, args: tuple, output: torch.Tensor) -> None:
            a, bias = args[0], module.bias is not None
            if last[0] is not a or last[1] != bias or last[2] != a._version:
                x = torch.cat([a, torch.ones_like(a[..., :1])], -1) if bias else a
                last[:] = a, bias, a._version, _moment(x, device)
            accumulate(name, 0, last[3])
            if output.requires_grad:
                output.register_hook(lambda grad: accumulate(name, 1, _moment(grad, device)))
        return fn

    def entry(module: nn.Linear, args: tuple) -> None:
        if not args[0].requires_grad:  # nothing before it is traced: the gradient enters here
            args[0].requires_grad_()

    handles = [layer.register_forward_hook(forward_hook(name)) for name, layer in layers.items()]
    # The factors need the layers' output gradients, not the weights': with the weights frozen and the gradient
    # entering at the inputs of these layers, backward skips every weight-gradient matmul (a third of its work), holds
    # no weight gradients (at 7B in bf16, 13.5 GB), and stops at the first of them (curvature block by block: the
    # blocks below the pass's are neither traced nor run backward).
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    handles += [layer.register_forward_pre_hook(entry) for layer in layers.values()]
    was_training = model.training
    model.eval()
    try:
        for ids in ranks.my_share(list(batches)):
            ids = ids.to(next(model.parameters()).device)
            inputs, targets = ids[:, :-1], ids[:, 1:]
            draws = max(1, fisher_samples)
            for _ in range(draws):
                model.zero_grad(set_to_none=True)
                logits = model(input_ids=inputs, use_cache=False).logits
                logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
                if fisher_samples:
                    with torch.no_grad():
                        labels = torch.distributions.Categorical(logits=logits).sample()
                else:
                    labels = targets
                # Summed over tokens: each token's output gradient is a gradient of the loss, not of a mean.
                F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum").backward()
                count[0] += inputs.numel()
    finally:
        last[:] = None, None, None, None
        for h in handles:
            h.remove()
        for p in trainable:
            p.requires_grad_(True)
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    if ranks.rank_and_world()[1] > 1:  # a rank with no batch adds zeros
        for name, layer in layers.items():
            where = device or layer.weight.device
            for i, size in enumerate(factor_sizes(layer)):
                if sums[name][i] is None:
                    sums[name][i] = torch.zeros(size, size, dtype=torch.float64, device=where)
        total = torch.tensor([float(count[0])], dtype=torch.float64)
        ranks.sum_over_ranks([t for pair in sums.values() for t in pair] + [total])
        count[0] = int(total.item())
    n = count[0]
    return {name: Factors(A / n, G / n) for name, (A, G) in sums.items()}


# -- costs: the loss increase of removing weights, ½ Δθᵀ F Δθ at the optimal update of the rest ----------------
def element_costs(w: torch.Tensor, f: Factors) -> torch.Tensor:
    """L_ij = ½ W_ij² / ([G⁻¹]_ii [A⁻¹]_jj)."""
    return 0.5 * w**2 / torch.outer(f.G_inv.diagonal(), f.A_inv.diagonal())


def element_costs_obd(w: torch.Tensor, f: Factors) -> torch.Tensor:
    """K-OBD: the diagonal of G ⊗ A, no inverse: ½ W_ij² G_ii A_jj (factors given as matrices or their diagonals)."""
    diag = lambda m: m if m.dim() == 1 else m.diagonal()  # noqa: E731
    return 0.5 * w**2 * torch.outer(diag(f.G), diag(f.A))


def row_costs(w: torch.Tensor, f: Factors) -> torch.Tensor:
    """Row r: ½ w_rᵀ A w_r / [G⁻¹]_rr."""
    return 0.5 * ((w @ f.A) * w).sum(1) / f.G_inv.diagonal()


def column_costs(w: torch.Tensor, f: Factors) -> torch.Tensor:
    """Column c: ½ w_cᵀ G w_c / [A⁻¹]_cc."""
    return 0.5 * ((f.G @ w) * w).sum(0) / f.A_inv.diagonal()


def row_costs_obd(w: torch.Tensor, f: Factors) -> torch.Tensor:
    return element_costs_obd(w, f).sum(1)


def column_costs_obd(w: torch.Tensor, f: Factors) -> torch.Tensor:
    return element_costs_obd(w, f).sum(0)


# -- correlated updates of the remaining weights ------------------------------------------------------------------
def remove_rows(w: torch.Tensor, f: Factors, rows: torch.Tensor) -> torch.Tensor:
    """W + ΔW with ΔW = −G⁻¹[:,R] ([G⁻¹]_RR)⁻¹ W_R: rows R become zero, the others compensate."""
    if len(rows) == 0:
        return w
    gi = f.G_inv
    w = w - gi[:, rows] @ torch.linalg.solve(gi[rows][:, rows], w[rows])
    w[rows] = 0.0  # exactly, not to rounding
    return w


def remove_columns(w: torch.Tensor, f: Factors, cols: torch.Tensor) -> torch.Tensor:
    """W + ΔW with ΔW = −W_:,C ([A⁻¹]_CC)⁻¹ A⁻¹[C,:]: columns C become zero, the others compensate."""
    if len(cols) == 0:
        return w
    ai = f.A_inv
    w = w - torch.linalg.solve(ai[cols][:, cols], w[:, cols].T).T @ ai[cols]
    w[:, cols] = 0.0
    return w


def remove_elements(w: torch.Tensor, f: Factors, mask: torch.Tensor, max_correlate: int = 2048) -> torch.Tensor:
    """OBS under F ≈ G ⊗ A: the weights in ``mask`` become zero and the rest compensate, in chunks of at most
    ``max_correlate`` weights whose updates are solved jointly (Δθ = −F⁻¹[:,Q]([F⁻¹]_QQ)⁻¹ θ_Q per chunk)."""
    w = w.clone()
    rows, cols = mask.nonzero(as_tuple=True)
    for start in range(0, len(rows), max_correlate):
        i, j = rows[start:start + max_correlate], cols[start:start + max_correlate]
        s = f.G_inv[i][:, i] * f.A_inv[j][:, j]  # [F⁻¹]_QQ for Q = {(i_q, j_q)}
        lam = torch.linalg.solve(s, w[i, j])
        w -= (f.G_inv[:, i] * lam) @ f.A_inv[j]
    w[mask] = 0.0  # exact zeros (later chunks moved earlier ones slightly)
    return w
